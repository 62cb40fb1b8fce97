"""`[daemon] event_loop`: the daemon runs the same on uvloop and on asyncio's own loop.

The parts that lean on the loop most (worker processes and their exits, timers, signals) are
exercised on both: a warm call, a timeout kill, a segfault, an async invocation and SIGTERM.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.daemon_proc import ROOT, Daemon, write_config

BASIC = ROOT / "tests" / "pool" / "functions" / "basic"


def functions(code: Path) -> str:
    return "".join(
        f'[functions.{name}]\nhandler = "handler.{name}"\ncode = "{code}"\ntimeout_s = 1\n'
        for name in ("count", "sleep", "crash")
    )


@pytest.mark.parametrize("choice", ["uvloop", "asyncio", "auto"])
async def test_the_daemon_serves_on_either_event_loop(tmp_path: Path, choice: str):
    daemon = Daemon(write_config(tmp_path, functions(BASIC), daemon=f'event_loop = "{choice}"'))
    await daemon.start()
    try:
        ready = [e for e in daemon.log_events() if e.get("event") == "daemon_ready"]
        assert ready[0]["event_loop"] == ("asyncio" if choice == "asyncio" else "uvloop")

        pids = set()
        for expected in (1, 2):
            status, _, body = await daemon.invoke("count", {})
            result = json.loads(body)
            assert status == 200 and result["calls"] == expected  # warm: the same worker
            pids.add(result["pid"])
        assert len(pids) == 1 and daemon.proc is not None and daemon.proc.pid not in pids

        status, headers, body = await daemon.invoke("sleep", {"s": 5})
        assert headers["X-Amz-Function-Error"] == "Unhandled"
        assert json.loads(body)["errorType"] == "Sandbox.Timedout"

        status, headers, body = await daemon.invoke("crash", {"how": "segfault"})
        assert "signal: segmentation fault" in json.loads(body)["errorMessage"]
        status, _, body = await daemon.invoke("crash", {})
        assert json.loads(body) == {"survived": True}  # a fresh worker serves the next call

        status, headers, _ = await daemon.invoke("count", {}, kind="Event")
        assert status == 202
        queued = headers["x-amzn-RequestId"]

        async def succeeded() -> bool:  # the admin API reads after the store's barrier
            return (await daemon.get(f"/v1/invocations/{queued}")).get("status") == "succeeded"

        await daemon.wait_logged(succeeded)

        await daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        await daemon.wait_log("daemon_stopped")
    finally:
        await daemon.close()


async def test_event_loop_must_be_a_known_choice(tmp_path: Path):
    config = write_config(tmp_path, functions(BASIC), daemon='event_loop = "tokio"')
    from daemon.cli import main

    assert main(["check", "--config", str(config)]) == 78
