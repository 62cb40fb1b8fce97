"""A worker's descendants: found through /proc, killed with their worker, reaped once adopted.

A handler can start processes that leave its worker's process group and session (`setsid()`)
and, by forking twice, its worker's tree of children too: killing the process group alone left
such a grandchild running after the timeout that killed its worker. So:

- `kill_tree(pid)` SIGKILLs a process, its process group and every descendant it has now, found
  through the `children` files of /proc (or, on a kernel without them, every /proc/PID/stat).
- The daemon is a child subreaper (`become_subreaper()`, Linux's PR_SET_CHILD_SUBREAPER): a
  process whose parent exits is re-parented to the daemon instead of to init, so a double-forked
  grandchild stays where the daemon can find it, as a child of its own that is not a worker.
- Each worker's environment carries a mark of its own (its AWS_LAMBDA_LOG_STREAM_NAME, unique per
  worker); such a child inherits it. `Orphans.sweep()` kills every adopted child whose mark is
  not a live worker's (and its descendants), and reaps the adopted children that have exited,
  each by its own pid: a blanket waitpid(-1) would steal the exit status of a worker from
  asyncio's (or uvloop's) child watcher, which waits for each worker by its pid.

A child with no mark (it replaced its environment) cannot be told from a child the process
started itself. The daemon starts no other children, so with `own_children` (the daemon's pool)
such a child is an orphan of a worker: it is killed when any worker ends, and reaped. A pool in a
process that starts other children (the tests) leaves those alone.

Log event: orphans_killed (info: pids, by worker mark or unmarked).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Iterable

import structlog

log = structlog.get_logger("lambdaemon.pool")

PR_SET_CHILD_SUBREAPER = 36
MARK_VARIABLE = b"AWS_LAMBDA_LOG_STREAM_NAME="
_ENVIRON_MAX_BYTES = 4 * 1024 * 1024  # past ARG_MAX's usual 2 MB: the whole of any environment

# Every pool's workers in this process (a test's process runs several pools): their marks, from
# just before the spawn until the exit is reaped, and their pids. A sweep never touches these.
LIVE_MARKS: set[str] = set()
WORKER_PIDS: set[int] = set()


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans; False off Linux or if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` now (any of its threads); [] when it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as listing:
                found.extend(int(child) for child in listing.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue  # the thread has exited
            return _children_by_stat(pid)  # a kernel without CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return found


def _children_by_stat(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _stat(int(entry))[1] == pid:
            found.append(int(entry))
    return found


def _stat(pid: int) -> tuple[str, int]:
    """(state letter, parent pid) from /proc/PID/stat; ("", 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # the name may hold ")" and spaces
        return fields[0].decode(), int(fields[1])
    except (OSError, IndexError, ValueError):
        return "", 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the tree of parents, nearest first."""
    found, queue, seen = [], [pid], {pid}
    while queue:
        for child in children(queue.pop(0)):
            if child not in seen:
                seen.add(child)
                found.append(child)
                queue.append(child)
    return found


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid`, its process group (when it leads one) and its descendants; their pids.

    The tree is read before the kill (a killed parent's children move to the subreaper). A
    process forked in between is in the group, or is found by the next sweep as an orphan.
    """
    below = descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _kill([pid, *below])
    return below


def _kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def mark_of(pid: int) -> str | None:
    """The worker mark in `pid`'s environment; None when it has none or cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            data = environ.read(_ENVIRON_MAX_BYTES)
    except OSError:
        return None
    for entry in data.split(b"\0"):
        if entry.startswith(MARK_VARIABLE):
            return entry[len(MARK_VARIABLE) :].decode("utf-8", "replace")
    return None


class Orphans:
    """This process's adopted children: killed when their worker is gone, reaped when exited."""

    def __init__(self, own_children: bool) -> None:
        self.own_children = own_children
        self._adopted: set[int] = set()  # children killed here, or (owning) seen unmarked
        self._killed: set[int] = set()  # killed, and still this process's children to reap
        self.killed_total = 0

    @property
    def pending(self) -> bool:
        """Children this sweeper killed that have not been reaped yet."""
        return bool(self._killed)

    def sweep(self, kill_unmarked: bool) -> int:
        """Kill adopted children whose worker is gone, reap those that exited; how many it
        killed. Workers (WORKER_PIDS) are never touched: their own watcher waits for them."""
        me = os.getpid()
        killed: list[int] = []
        unmarked: list[int] = []
        for pid in children(me):
            if pid in WORKER_PIDS:
                continue
            state, _ = _stat(pid)
            if state == "Z":
                if pid in self._adopted or self.own_children:
                    self._reap(pid)
                continue
            mark = mark_of(pid)
            if mark is None:
                if not self.own_children or state == "":
                    continue
                self._adopted.add(pid)
                if kill_unmarked:
                    unmarked.append(pid)
                continue
            if mark not in LIVE_MARKS:  # (a live mark: its worker's end will come for it)
                killed.append(pid)
        below = [child for pid in [*killed, *unmarked] for child in kill_tree(pid)]
        self._killed.update(killed, unmarked, below)
        self._adopted |= self._killed
        self._adopted = {pid for pid in self._adopted if _stat(pid)[1] == me}
        self._killed &= self._adopted
        count = len(killed) + len(unmarked) + len(below)
        if count:
            self.killed_total += count
            log.info("orphans_killed", pids=sorted({*killed, *unmarked, *below}), unmarked=unmarked)
        return count

    def _reap(self, pid: int) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere meanwhile
            pass
        self._adopted.discard(pid)
        self._killed.discard(pid)
