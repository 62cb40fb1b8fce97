"""daemon/resources.py: the NOFILE limit raised at start, and accept() pauses logged quietly while
a real asyncio server runs out of descriptors and accepts again once they are back."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
from collections.abc import Iterator

import pytest

from daemon.resources import PAUSE_LOG_S, LoopExceptionHandler, raise_nofile_limit
from tests.pool.conftest import descriptors_exhausted
from tests.waits import LogWatch, watch_logs


@contextlib.contextmanager
def nofile_soft(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_raise_nofile_limit_raises_the_soft_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with nofile_soft(min(hard, 1024) - 1), watch_logs() as logs:
        assert raise_nofile_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert raise_nofile_limit() == (hard, hard)  # already there: nothing to raise
    first, second = logs.find("nofile_limit")
    assert (first["soft"], first["hard"], first["raised_from"]) == (hard, hard, min(hard, 1024) - 1)
    assert second["raised_from"] is None


class _Accepted(asyncio.Protocol):
    def __init__(self, accepted: asyncio.Queue[asyncio.BaseTransport]) -> None:
        self._accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accepted.put_nowait(transport)


async def test_accept_pauses_are_logged_once_without_traceback_and_accepting_resumes() -> None:
    loop = asyncio.get_running_loop()
    handler = LoopExceptionHandler()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(handler)
    accepted: asyncio.Queue[asyncio.BaseTransport] = asyncio.Queue()
    server = await loop.create_server(lambda: _Accepted(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [socket.socket() for _ in range(20)]  # made now: connecting needs no descriptor
    try:
        with watch_logs() as logs:
            with descriptors_exhausted():
                for client in clients:
                    client.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        client.connect(("127.0.0.1", port))
                # asyncio's loop tries accept(), fails with EMFILE and pauses
                await logs.wait_for("accept_paused")
            # Back after the pause (asyncio retries after 1 s): every client is accepted.
            async with asyncio.timeout(10):
                transports = [await accepted.get() for _ in clients]
        _check_logged_once(logs, handler)
    finally:
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()
        loop.set_exception_handler(previous)
    for transport in transports:
        transport.close()


def _check_logged_once(logs: LogWatch, handler: LoopExceptionHandler) -> None:
    [line] = logs.find("accept_paused")  # one per PAUSE_LOG_S, however many pauses
    assert PAUSE_LOG_S >= 10
    assert line["log_level"] == "warning" and line["errno"] == "EMFILE"
    assert "exc_info" not in line and "exception" not in line
    assert line["listener"].startswith("127.0.0.1:")
    assert handler.paused >= line["pauses"] >= 1


async def test_other_loop_errors_are_still_logged_in_full(caplog: pytest.LogCaptureFixture) -> None:
    handler = LoopExceptionHandler()
    try:
        raise OSError(errno.EMFILE, "Too many open files")
    except OSError as exc:
        error = exc
    # Not an accept(): an EMFILE elsewhere is a bug to see with its traceback.
    handler(asyncio.get_running_loop(), {"message": "Unhandled error", "exception": error})
    [record] = [r for r in caplog.records if r.name == "asyncio"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert record.getMessage() == "Unhandled error" and handler.paused == 0
