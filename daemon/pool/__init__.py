"""The worker pool: handlers run in warm worker processes supervised from the daemon's event loop.

`WorkerPool` (supervisor.py) is loaded on first use: the worker process imports this package on its
way to `daemon.pool.worker` and must not pay for asyncio, structlog and the config module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.pool.supervisor import WorkerPool

__all__ = ["WorkerPool"]


def __getattr__(name: str) -> Any:
    if name == "WorkerPool":
        from daemon.pool.supervisor import WorkerPool

        return WorkerPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
