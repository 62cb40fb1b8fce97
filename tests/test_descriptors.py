"""The daemon out of file descriptors: idle connections use up NOFILE, a call fails at once with
a clear error instead of hanging, /health says why, and all is well once the connections close.

The real daemon as a subprocess with a low NOFILE limit (soft and hard, so it cannot raise it),
on both event loops: asyncio's pauses accept() (the connections wait in the backlog), uvloop's
accepts and closes what it has no descriptor for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.daemon_proc import ROOT, Daemon, write_config
from tests.waits import until

NOFILE = 160  # the daemon needs about 30 at rest
ECHO = ROOT / "tests" / "functions" / "echo"
START_FAILED = "Lambdaemon.WorkerStartFailed"


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections to the port that never send a byte, closed on the way out."""
    conns = []
    try:
        for _ in range(count):
            conn = socket.socket()
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # past the backlog: still connecting
                conn.connect(("127.0.0.1", port))
            conns.append(conn)
        yield conns
    finally:
        for conn in conns:
            conn.close()


async def call(session: aiohttp.ClientSession, daemon: Daemon) -> tuple[int, dict[str, Any]]:
    url = f"{daemon.base}/2015-03-31/functions/echo/invocations"
    async with asyncio.timeout(10):  # a hang is the bug this file is about
        async with session.post(url, data=b'{"n": 1}') as resp:
            return resp.status, await resp.json()


async def health(session: aiohttp.ClientSession, daemon: Daemon) -> tuple[int, dict[str, Any]]:
    async with asyncio.timeout(10):
        async with session.get(f"{daemon.base}/health") as resp:
            return resp.status, await resp.json()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_daemon_out_of_descriptors_fails_calls_clearly_and_recovers(
    tmp_path: Any, event_loop: str
) -> None:
    body = (
        f'[functions.echo]\nhandler = "handler.handler"\ncode = "{ECHO}"\n'
        "retries = 10\nretry_backoff_s = [0.2, 0.5]\n"
    )
    config = write_config(tmp_path, body, daemon=f'event_loop = "{event_loop}"\nmax_workers = 1')
    daemon = Daemon(config, nofile=NOFILE)
    await daemon.start()
    # One connection, opened while descriptors are plenty, carries the calls below.
    kept = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        [limit] = await daemon.wait_log("nofile_limit")
        assert (limit["soft"], limit["hard"]) == (NOFILE, NOFILE)
        assert (await health(kept, daemon))[0] == 200
        mark = daemon.log_mark()

        with idle_connections(daemon.api_port, NOFILE + 40):
            # Polled: nothing announces that the daemon has used up its descriptors.
            await until(lambda: open_descriptors(pid) >= NOFILE, 10, "the daemon at NOFILE")
            for _ in range(3):  # with max_workers = 1, a slot lost to the first would hang
                status, error = await call(kept, daemon)
                assert status == 200 and error["errorType"] == START_FAILED, error
                assert "Too many open files" in error["errorMessage"]
            # An async call is stored, fails its attempt the same way, and waits for a retry.
            async with asyncio.timeout(10):
                url = f"{daemon.base}/2015-03-31/functions/echo/invocations"
                headers = {"X-Amz-Invocation-Type": "Event"}
                async with kept.post(url, data=b'{"n": 2}', headers=headers) as resp:
                    assert resp.status == 202
                    queued = resp.headers["x-amzn-RequestId"]
            await daemon.wait_log("invocation_retry_scheduled", invocation_id=queued, attempt=1)
            status, report = await health(kept, daemon)
            assert status == 503, report
            assert report["status"] == "degraded" and report["reason"] == "workers_cannot_start"
            assert "Too many open files" in report["error"]
            assert report["pool"]["failed_starts"] >= 3

        await kept.close()
        # Polled: the daemon frees what the closed connections held as it reads their EOF.
        await until(lambda: open_descriptors(pid) < NOFILE // 2, 10, "descriptors freed")
        async with aiohttp.ClientSession() as fresh:  # a new connection is accepted again
            status, result = await call(fresh, daemon)
            assert status == 200 and result["event"] == {"n": 1}, result
            status, report = await health(fresh, daemon)
            assert status == 200 and report["pool"]["status"] == "ok", report
        await daemon.wait_log("pool_restored", since=mark)
        record = await daemon.finished(queued, status="succeeded")
        assert record["attempts"][0]["error_type"] == START_FAILED, record
        events = daemon.log_events()[mark:]
        # Loud once, and no traceback for the accept() failures (asyncio's pauses are logged
        # quietly; uvloop logs none).
        assert len([e for e in events if e["event"] == "pool_degraded"]) == 1
        assert not [e for e in events if "exception" in e], json.dumps(events)[:2000]
        if event_loop == "asyncio":
            assert [e for e in events if e["event"] == "accept_paused"]
    finally:
        await kept.close()
        await daemon.close()
