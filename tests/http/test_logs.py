"""GET /v1/logs and `lambdaemon logs`: past lines from the store, followed lines as they happen,
and a follower that does not read costs the daemon nothing but its socket."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.daemon_proc import ROOT, Daemon, running_daemon

FUNCS = Path(__file__).resolve().parents[1] / "functions"


def body(tmp_path: Path) -> str:
    chatty = tmp_path / "chatty"
    chatty.mkdir()
    (chatty / "app.py").write_text(
        "def handler(event, context):\n"
        "    for i in range(event.get('lines', 1)):\n"
        "        print(f'line {i} of {context.aws_request_id}')\n"
        "    if event.get('fail'):\n"
        "        raise ValueError('asked to fail')\n"
        "    return {'ok': True}\n"
    )
    return (
        f'[functions.echo]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n\n'
        f'[functions.chatty]\nhandler = "app.handler"\ncode = "{chatty}"\nconcurrency = 2\n'
    )


@pytest.fixture
async def daemon(tmp_path):
    # a megabyte of output per invocation is kept: the slow follower's test prints a lot
    async with running_daemon(
        tmp_path, body(tmp_path), daemon="log_capture_bytes = 1048576\n"
    ) as d:
        yield d


async def lines_of(daemon: Daemon, query: str) -> list[dict[str, Any]]:
    assert daemon.session is not None
    async with daemon.session.get(f"{daemon.base}/v1/logs?{query}") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in (await resp.read()).splitlines()]


async def invoke(daemon: Daemon, name: str, event: dict[str, Any]) -> str:
    status, headers, _ = await daemon.invoke(name, event)
    assert status == 200
    return headers["x-amzn-RequestId"]


async def test_past_lines_are_lambdas_start_output_end_report(daemon: Daemon):
    ok = await invoke(daemon, "chatty", {"lines": 2})
    failed = await invoke(daemon, "chatty", {"fail": True})
    await invoke(daemon, "echo", {})
    lines = await lines_of(daemon, "function=chatty&since=1h")
    texts = [line["line"] for line in lines]
    assert texts[:5] == [
        f"START RequestId: {ok} Version: $LATEST",
        f"line 0 of {ok}",
        f"line 1 of {ok}",
        f"END RequestId: {ok}",
        texts[4],
    ]
    assert texts[4].startswith(f"REPORT RequestId: {ok}\tDuration: ")
    assert "Memory Size: 128 MB" in texts[4]
    assert {line["function"] for line in lines} == {"chatty"}
    assert {line["invocation_id"] for line in lines} == {ok, failed}
    only_failed = await lines_of(daemon, "function=chatty&since=1h&status=failed")
    assert {line["invocation_id"] for line in only_failed} == {failed}
    assert any("asked to fail" in line["line"] for line in only_failed)
    everything = await lines_of(daemon, "since=1h")
    assert {line["function"] for line in everything} == {"chatty", "echo"}


async def test_bad_queries_are_400_or_404_with_the_reason(daemon: Daemon):
    assert daemon.session is not None
    for query, status, words in [
        ("function=chatty&since=yesterday", 400, "since"),
        ("function=chatty&since=2026-01-01T00:00:00", 400, "offset"),
        ("function=chatty&status=odd", 400, "unknown status"),
        ("function=chatty&colour=red", 400, "unknown parameter 'colour'"),
        ("function=chatty&format=xml", 400, "format"),
        ("function=nobody", 404, "no function"),
    ]:
        async with daemon.session.get(f"{daemon.base}/v1/logs?{query}") as resp:
            assert resp.status == status, query
            assert words in (await resp.json())["error"], query


async def test_follow_streams_new_lines_as_they_happen(daemon: Daemon):
    earlier = await invoke(daemon, "chatty", {})
    assert daemon.session is not None
    url = f"{daemon.base}/v1/logs?function=chatty&since=1h&follow=1"
    async with daemon.session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        seen: list[dict[str, Any]] = []

        async def until_report(invocation_id: str) -> None:
            while not any(
                line["invocation_id"] == invocation_id and line["line"].startswith("REPORT")
                for line in seen
            ):
                seen.append(json.loads(await resp.content.readline()))

        await asyncio.wait_for(until_report(earlier), 10)  # the past first
        later = await invoke(daemon, "chatty", {"lines": 3})
        await asyncio.wait_for(until_report(later), 10)  # then what happens
    ids = [line["invocation_id"] for line in seen]
    assert ids.count(earlier) == 4 and ids.count(later) == 6  # each printed once
    assert [line["line"] for line in seen if line["invocation_id"] == later][1:4] == [
        f"line {i} of {later}" for i in range(3)
    ]


async def test_server_sent_events_for_a_browser(daemon: Daemon):
    done = await invoke(daemon, "chatty", {})
    assert daemon.session is not None
    url = f"{daemon.base}/v1/logs?function=chatty&since=1h"
    async with daemon.session.get(url, headers={"Accept": "text/event-stream"}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = (await resp.text()).split("\n\n")
    data = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: ")]
    assert data[0]["line"] == f"START RequestId: {done} Version: $LATEST"


async def test_a_follower_that_does_not_read_is_told_what_it_missed(daemon: Daemon):
    """A client that follows but does not read: invocations go on at full speed, its lines
    wait in a bounded queue, and once it reads it is told how many were dropped."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", daemon.api_port))
    sock.sendall(b"GET /v1/logs?function=chatty&since=1s&follow=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        # 20 invocations of 5,000 lines (about 20 MB as JSON): far more than the follower's
        # queue and the sockets' buffers hold
        for _ in range(10):
            await asyncio.gather(*(invoke(daemon, "chatty", {"lines": 5000}) for _ in range(2)))
        sock.setblocking(False)
        received = b""
        loop = asyncio.get_running_loop()

        async def until_missed() -> None:
            nonlocal received
            while b'"missed":' not in received:
                received += await loop.sock_recv(sock, 65536)

        await asyncio.wait_for(until_missed(), 20)
    finally:
        sock.close()
    notice = next(json.loads(line) for line in received.split(b"\r\n") if b'"missed":' in line)
    assert notice["missed"] > 0 and "lines missed" in notice["line"]


async def test_cli_prints_and_follows(daemon: Daemon):
    done = await invoke(daemon, "chatty", {"lines": 1})
    command = [sys.executable, "-m", "daemon.cli", "--config", str(daemon.config), "logs"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, cwd=ROOT, timeout=60
        )

    printed = await asyncio.to_thread(run, "chatty", "--since", "1h")
    assert printed.returncode == 0, printed.stderr
    assert f"  line 0 of {done}" in printed.stdout
    assert printed.stdout.splitlines()[0].endswith(f"START RequestId: {done} Version: $LATEST")
    refused = await asyncio.to_thread(run, "chatty", "--since", "soon")
    assert refused.returncode == 1 and "since" in refused.stderr

    follower = await asyncio.create_subprocess_exec(
        *command,
        "chatty",
        "-f",
        "--since",
        "1m",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert follower.stdout is not None
        later = ""
        lines: list[str] = []

        async def until_seen() -> None:
            nonlocal later
            while True:
                if not later:
                    later = await invoke(daemon, "chatty", {"lines": 1})
                line = (await follower.stdout.readline()).decode()
                lines.append(line)
                if f"line 0 of {later}" in line:
                    return

        await asyncio.wait_for(until_seen(), 20)
    finally:
        follower.send_signal(signal.SIGINT)
        await follower.wait()


async def test_a_follow_ends_cleanly_when_the_daemon_stops(tmp_path: Path):
    async with running_daemon(tmp_path, body(tmp_path)) as d:
        async with aiohttp.ClientSession() as session:
            url = f"{d.base}/v1/logs?function=chatty&since=1h&follow=1"
            async with session.get(url) as resp:
                assert resp.status == 200
                await d.signal(signal.SIGTERM)
                rest = await asyncio.wait_for(resp.read(), 10)  # ends with the stream's last chunk
                assert rest == b""
                assert await d.wait(20) == 0
