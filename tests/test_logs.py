"""Log lines: JSON with a journald priority, for our events and for libraries' stdlib logging."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import threading
from pathlib import Path

import structlog

from daemon.logs import configure_logging


@contextlib.contextmanager
def json_logs(stream):
    """JSON logging to `stream` for the block; structlog and the root logger restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", json=True, stream=stream)
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_logs_json_lines_with_priority_for_ours_and_stdlib():
    out = io.BytesIO()
    with json_logs(out):
        structlog.get_logger("lambdaemon.test").info(
            "invocation_finished", invocation_id="abc", duration_ms=1.5, path=io
        )
        structlog.get_logger("lambdaemon.test").debug("too_quiet")
        logging.getLogger("aiohttp.server").warning("peer %s went away", "1.2.3.4")
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 2, lines
    ours, theirs = (json.loads(line[3:]) for line in lines)
    assert lines[0].startswith("<6>") and lines[1].startswith("<4>")
    assert ours["event"] == "invocation_finished" and ours["invocation_id"] == "abc"
    assert ours["level"] == "info" and ours["timestamp"].endswith("Z")
    assert "module 'io'" in ours["path"]  # unserialisable values are logged as text
    assert theirs["event"] == "peer 1.2.3.4 went away" and theirs["level"] == "warning"


def test_logs_text_that_is_not_unicode_is_escaped_not_raised():
    out = io.BytesIO()
    name = os.fsdecode(b"caf\xe9.txt")  # a file name that is not UTF-8: a lone surrogate
    with json_logs(out):
        structlog.get_logger("lambdaemon.test").info(
            "files_claimed", name=name, path=Path("/in") / name, size=3, names=[name]
        )
    (line,) = out.getvalue().decode().splitlines()
    logged = json.loads(line[3:])
    assert logged["name"] == "caf\\udce9.txt" and logged["names"] == ["caf\\udce9.txt"]
    assert logged["path"] == "/in/caf\\udce9.txt" and logged["size"] == 3


class _Writes(io.BytesIO):
    """A stream that remembers each write, to see how lines were gathered."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return super().write(data)


async def test_lines_logged_in_one_loop_iteration_go_out_in_one_write_in_order():
    out = _Writes()
    with json_logs(out):
        log = structlog.get_logger("lambdaemon.test")
        log.info("first", n=1)
        log.info("second", n=2)
        assert out.writes == []  # gathered until the loop has run this iteration's callbacks
        log.warning("third", n=3)  # a warning goes out at once, after what was gathered
        assert len(out.writes) == 1
        log.info("fourth", n=4)
        log.info("fifth", n=5)
        # Callbacks run in the order they were scheduled: once this one has, so has the flush.
        after_flush = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(after_flush.set_result, None)
        await asyncio.wait_for(after_flush, timeout=5)
        assert len(out.writes) == 2
        logging.getLogger("aiohttp.server").error("from a library")  # through the same output
    events = [json.loads(line[3:])["event"] for line in out.getvalue().decode().splitlines()]
    assert events == ["first", "second", "third", "fourth", "fifth", "from a library"]
    assert len(out.writes) == 3


async def test_lines_from_other_threads_join_a_pending_write_and_a_stopped_loop_blocks_none():
    out = _Writes()
    with json_logs(out):
        log = structlog.get_logger("lambdaemon.test")
        log.info("on_the_loop")
        thread = threading.Thread(target=log.info, args=("from_a_thread",))
        thread.start()
        thread.join(timeout=5)  # blocking the loop: its turn has not ended
        assert out.writes == []  # the thread's line waits for the loop's write, in order
        after_flush = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(after_flush.set_result, None)
        await asyncio.wait_for(after_flush, timeout=5)
        assert len(out.writes) == 1 and out.writes[0].index(b"on_the_loop") < out.writes[0].index(
            b"from_a_thread"
        )

        def on_a_loop_that_stops() -> None:
            async def log_and_interrupt() -> None:
                log.info("last_words")  # its flush is scheduled; the loop stops before it runs
                raise KeyboardInterrupt

            loop = asyncio.new_event_loop()
            with contextlib.suppress(KeyboardInterrupt):
                loop.run_until_complete(log_and_interrupt())
            loop.close()  # the scheduled flush never ran
            assert not any(b"last_words" in w for w in out.writes)
            log.info("after_the_loop")  # not held back by the loop that stopped: written now

        thread = threading.Thread(target=on_a_loop_that_stops)
        thread.start()
        thread.join(timeout=5)
        assert any(b"last_words" in w and b"after_the_loop" in w for w in out.writes)


def test_lines_logged_outside_an_event_loop_are_written_at_once():
    out = _Writes()
    with json_logs(out):
        structlog.get_logger("lambdaemon.test").info("alone")
        assert len(out.writes) == 1 and b'"event":"alone"' in out.writes[0]


def test_per_invocation_lines_are_the_lines_structlog_would_write_and_step_aside_otherwise():
    from structlog.testing import capture_logs

    from daemon import logs

    out = io.BytesIO()
    started = {"invocation_id": "abc", "function": 'f\u00e9 "x"', "attempt": 1}
    finished = {
        "invocation_id": "abc",
        "function": 'f\u00e9 "x"',
        "status": "failed",
        "attempt": 2,
        "duration_ms": 0.328,
        "error_type": "Value\nError",
    }
    with json_logs(out):
        log = structlog.get_logger("lambdaemon.test")
        log.info("invocation_started", **started)
        logs.invocation_started(log, "abc", 'f\u00e9 "x"', 1)
        log.info("invocation_finished", **finished)
        logs.invocation_finished(log, "abc", 'f\u00e9 "x"', "failed", 2, 0.328, "Value\nError")
        logs.invocation_finished(log, "abc", "f", "succeeded", 1, 1.5, None)
        with capture_logs() as captured:  # structlog configured otherwise: it is log.info()
            logs.invocation_started(log, "abc", "f", 1)
        logs.flush()
        assert captured == [
            {
                "event": "invocation_started",
                "invocation_id": "abc",
                "function": "f",
                "attempt": 1,
                "log_level": "info",
            }
        ]
        configure_logging("warning", json=True, stream=out)  # filtered out as structlog would
        logs.invocation_started(structlog.get_logger("lambdaemon.test"), "abc", "f", 1)
        logs.flush()
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 5, lines
    for slow, fast in (lines[0:2], lines[2:4]):
        assert slow[:3] == fast[:3] == "<6>"
        slow_event, fast_event = json.loads(slow[3:]), json.loads(fast[3:])
        assert list(slow_event) == list(fast_event)  # the same keys in the same order
        del slow_event["timestamp"], fast_event["timestamp"]
        assert slow_event == fast_event
    assert json.loads(lines[4][3:])["error_type"] is None
