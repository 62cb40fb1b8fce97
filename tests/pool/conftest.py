"""Fixtures for the pool tests: real worker processes, and log events to wait on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from daemon.config import FunctionConfig
from daemon.models import InvokeRequest
from daemon.pool import WorkerPool
from tests.waits import LogWatch, watch_logs

FUNCTIONS = Path(__file__).parent / "functions"
BASIC = FUNCTIONS / "basic"


def function(
    name: str, handler: str = "handler.count", code: Path = BASIC, **settings: Any
) -> FunctionConfig:
    return FunctionConfig(handler=handler, name=name, code=str(code), **settings)


def request(fn: FunctionConfig, event: bytes = b"{}", **fields: Any) -> InvokeRequest:
    return InvokeRequest(fields.pop("invocation_id", str(uuid.uuid4())), event, fn.arn, **fields)


def reapable(pid: int) -> bool:
    """True while `pid` exists at all, even as a zombie nobody has reaped."""
    return os.path.exists(f"/proc/{pid}")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def gone(pid: int, timeout_s: float = 5.0) -> bool:
    """Wait (bounded) until `pid` has exited; works for processes that are not our children."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: None if exited.done() else exited.set_result(None))
    try:
        async with asyncio.timeout(timeout_s):
            await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return True


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[None]:
    """This process at its NOFILE soft limit (lowered for the block): the next open() is EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    filler: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                filler.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    with watch_logs() as watch:
        yield watch


@pytest.fixture
async def make_pool(logs: LogWatch) -> AsyncIterator[Callable[..., Any]]:
    """Start pools on demand; every one is closed at the end, and leaves no process behind."""
    pools: list[WorkerPool] = []

    async def make(
        max_workers: int = 4,
        functions: Mapping[str, FunctionConfig] | None = None,
        log_capture_bytes: int = 65536,
    ) -> WorkerPool:
        pool = WorkerPool(max_workers, log_capture_bytes)
        pools.append(pool)
        await pool.start(functions or {})
        return pool

    yield make
    for pool in pools:
        await pool.close()
    started = [entry["pid"] for entry in logs.find("worker_started")]
    assert not [pid for pid in started if alive(pid)]


@pytest.fixture
async def pool(make_pool: Callable[..., Any]) -> WorkerPool:
    return await make_pool()  # type: ignore[no-any-return]
