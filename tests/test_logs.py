"""Log lines: JSON with a journald priority, for our events and for libraries' stdlib logging."""

from __future__ import annotations

import io
import json
import logging

import structlog

from daemon.logs import configure_logging


def test_logs_json_lines_with_priority_for_ours_and_stdlib():
    out = io.BytesIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", json=True, stream=out)
        structlog.get_logger("lambdaemon.test").info("invocation_finished", invocation_id="abc",
                                                     duration_ms=1.5, path=io)  # fmt: skip
        structlog.get_logger("lambdaemon.test").debug("too_quiet")
        logging.getLogger("aiohttp.server").warning("peer %s went away", "1.2.3.4")
    finally:
        structlog.reset_defaults()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 2, lines
    ours, theirs = (json.loads(line[3:]) for line in lines)
    assert lines[0].startswith("<6>") and lines[1].startswith("<4>")
    assert ours["event"] == "invocation_finished" and ours["invocation_id"] == "abc"
    assert ours["level"] == "info" and ours["timestamp"].endswith("Z")
    assert "module 'io'" in ours["path"]  # unserialisable values are logged as text
    assert theirs["event"] == "peer 1.2.3.4 went away" and theirs["level"] == "warning"
