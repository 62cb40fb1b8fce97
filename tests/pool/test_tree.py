"""A worker's descendants end with it, whatever session or process group they moved to.

The handlers leave a sleeping process behind that writes its pid to a file: a child in a session
of its own (still the worker's child), or a grandchild that forked twice (re-parented to the
daemon, the subreaper, as its middle process exits), with or without the worker's environment.
Whichever way its worker ends (timeout, crash, recycling, the daemon's stop), that process is
gone within a bounded wait, and reaped: no zombie is left in the daemon either.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from daemon.models import Status
from daemon.pool import WorkerPool
from daemon.pool.descendants import _children_by_stat, children, descendants, kill_tree
from tests.daemon_proc import Daemon, running_daemon
from tests.pool.conftest import BASIC, alive, function, gone, reapable, request
from tests.waits import until, until_changed


async def pid_in(path: Path) -> int:
    """The pid a handler's process wrote to `path` (written whole: renamed into place)."""
    return int(await until_changed(path, lambda: path.exists() and path.read_text(), 10))


async def ended(pid: int) -> None:
    """`pid` has exited and been reaped (no zombie left): bounded."""
    assert await gone(pid, 10)
    # the daemon reaps the orphans it killed on its next sweep, 0.1 s later: polled
    await until(lambda: not reapable(pid), 10, f"{pid} reaped")


async def test_timeout_kills_a_child_in_a_session_of_its_own(
    pool: WorkerPool, tmp_path: Path
) -> None:
    fn = function("setsid", "handler.setsid_child", timeout_s=1.0)
    pidfile = tmp_path / "child.pid"
    outcome = await pool.invoke(
        fn, request(fn, json.dumps({"pidfile": str(pidfile), "s": 30}).encode())
    )
    assert outcome.status is Status.TIMED_OUT
    child = await pid_in(pidfile)
    assert await gone(child, 5)


def tree_functions() -> str:
    """The plain worker's way of ending its descendants (descendants.py), which these tests
    follow by the host pids the handlers write: sandbox = false. In a sandbox, its PID namespace
    does it (tests/pool/test_sandbox.py, a setsid() grandchild gone after the timeout)."""

    def entry(name: str, **settings: object) -> str:
        lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
        return (
            f'[functions.{name}]\nhandler = "handler.double_fork"\ncode = "{BASIC}"\n'
            f"sandbox = false\n{lines}"
        )

    return "".join(
        [
            entry("timeout", timeout_s=1),
            entry("crash"),
            entry("recycled", max_invocations_per_worker=1),
            entry("live"),
        ]
    )


async def leave_grandchild(daemon: Daemon, name: str, pidfile: Path, **event: object) -> int:
    status, _, body = await daemon.invoke(name, {"pidfile": str(pidfile), **event})
    assert status == 200, body
    return await pid_in(pidfile)


async def test_a_double_forked_grandchild_ends_with_its_worker_however_it_ends(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, tree_functions()) as daemon:
        live = await leave_grandchild(daemon, "live", tmp_path / "live.pid")
        for name, event in [
            ("timeout", {"s": 30}),  # killed at its deadline
            ("crash", {"exit": True}),  # the worker exits on its own after the fork
            ("recycled", {}),  # retired after its one call
            ("timeout", {"s": 30, "env": False}),  # carries no mark of its worker
        ]:
            pidfile = tmp_path / f"{name}-{len(event)}.pid"
            grandchild = await leave_grandchild(daemon, name, pidfile, **event)
            await ended(grandchild)
        # the other workers' ends did not touch a grandchild of a worker still warm
        assert alive(live)
        assert daemon.proc is not None
    # the daemon's stop ends the last worker, and with it its grandchild
    await ended(live)


async def test_an_adopted_grandchild_that_exits_on_its_own_is_reaped(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, tree_functions()) as daemon:
        grandchild = await leave_grandchild(daemon, "live", tmp_path / "quick.pid", grandchild_s=0)
        assert await gone(grandchild, 10)
        # no worker ended: the daemon's periodic sweep (every 10 s) reaps it; polled
        await until(lambda: not reapable(grandchild), 20, f"{grandchild} reaped")
        status, _, _ = await daemon.invoke("live", {"pidfile": str(tmp_path / "again.pid")})
        assert status == 200  # the worker it came from is untouched


async def test_a_pool_sweeping_after_its_worker_leaves_another_pools_workers_alone(
    make_pool: Any,
) -> None:
    first: WorkerPool = await make_pool()
    second: WorkerPool = await make_pool()
    fn = function("count")
    warm = await second.invoke(fn, request(fn))
    slow = function("slow", "handler.sleep", timeout_s=0.5)
    timed_out = await first.invoke(slow, request(slow, b'{"s": 30}'))
    assert timed_out.status is Status.TIMED_OUT  # its worker ended, and the first pool swept
    again = await second.invoke(fn, request(fn))
    assert again.worker_pid == warm.worker_pid and json.loads(again.payload)["calls"] == 2


async def test_the_tree_read_from_children_files_and_from_every_stat_agree(
    tmp_path: Path,
) -> None:
    # descendants.py reads /proc/PID/task/*/children, and every /proc/PID/stat on a kernel
    # built without those files: both must find the same tree (a child, and its own child).
    pidfile = tmp_path / "grandchild.pid"
    script = f"sleep 300 & echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && wait"
    child = await asyncio.create_subprocess_exec("sh", "-c", script)
    try:
        grandchild = await pid_in(pidfile)
        assert child.pid in children(os.getpid())
        assert sorted(children(os.getpid())) == sorted(_children_by_stat(os.getpid()))
        assert children(child.pid) == _children_by_stat(child.pid) == [grandchild]
        assert descendants(child.pid) == [grandchild]
        assert sorted(kill_tree(child.pid)) == [grandchild]
        assert await child.wait() == -9
        assert await gone(grandchild, 5)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
