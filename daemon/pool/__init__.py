"""The worker pool: handlers run in warm worker processes supervised from the daemon's event loop.

`WorkerPool` (supervisor.py) is loaded on first use: the worker process imports this package on its
way to `daemon.pool.worker` and must not pay for asyncio, structlog and the config module.
"""

from __future__ import annotations

# Not typing.TYPE_CHECKING: importing typing would cost the worker ~0.4 MB and ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from daemon.pool.supervisor import WorkerPool

__all__ = ["WorkerPool"]


def __getattr__(name: str) -> Any:
    if name == "WorkerPool":
        from daemon.pool.supervisor import WorkerPool

        return WorkerPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
