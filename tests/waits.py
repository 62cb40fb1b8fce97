"""Bounded waits for the tests: on what the code under test signals, polling only as a last resort.

- `LogWatch` / `watch_logs()`: log events of the parts running in the test's own loop, as data,
  and a wait for one that has not happened yet (resolved as the line is logged).
- `until_changed(path, check)`: `check` tried now and each time the kernel reports a change to
  a file or a folder (inotify): files written by workers, handlers or the daemon subprocess,
  the daemon's own log included (tests/daemon_proc.py).
- `until(predicate)`: polling, for state that nothing announces; each remaining call site
  says why in a comment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import structlog
from asyncinotify import Inotify, Mask

# What a change to a watched file (its writes) or folder (its entries) looks like to inotify.
CHANGES = Mask.MODIFY | Mask.CLOSE_WRITE | Mask.CREATE | Mask.DELETE | Mask.MOVE | Mask.ATTRIB
APPEARS = Mask.CREATE | Mask.MOVED_TO


async def until(
    predicate: Callable[[], Any], timeout_s: float = 15, what: str = "", interval_s: float = 0.01
) -> Any:
    """Poll `predicate` (plain or async) until it returns something truthy; bounded.

    Tried at once, then after `interval_s`, doubling up to 0.1 s between tries.
    """
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if value := await _value(predicate()):
                    return value
                await asyncio.sleep(interval_s)  # polling, bounded by the timeout above
                interval_s = min(interval_s * 2, max(interval_s, 0.1))
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


async def until_changed(
    path: Path, check: Callable[[], Any], timeout_s: float = 15, what: str = ""
) -> Any:
    """`check()`'s first truthy value, tried now and after each change the kernel reports to
    `path` (a file's writes, a folder's entries); bounded. `check` may be async.

    A `path` that does not exist yet is waited for in the folders above it.
    """
    try:
        async with asyncio.timeout(timeout_s):
            with Inotify() as inotify:
                watched = _watch(inotify, path)  # before the first look: no change is missed
                while not (value := await _value(check())):
                    await inotify.get()
                    watched = watched or _watch(inotify, path)
                return value
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what or path}") from None


def _watch(inotify: Inotify, path: Path) -> bool:
    """Watch `path`; while it is missing, the nearest folder above it that exists, which tells
    when the next one down appears. True once `path` itself is watched."""
    missing = []
    for folder in (path, *path.parents):
        try:
            inotify.add_watch(folder, CHANGES if folder == path else APPEARS)
            break
        except FileNotFoundError:
            missing.append(folder)
    for folder in reversed(missing):  # any created meanwhile, from the top down
        try:
            inotify.add_watch(folder, CHANGES if folder == path else APPEARS)
        except FileNotFoundError:
            return False
    return True


async def _value(value: Any) -> Any:
    return await value if isinstance(value, Awaitable) else value


class LogWatch:
    """Log events as data (as `structlog.testing.capture_logs` keeps them, `log_level`
    included), and a bounded wait for one that has not happened yet. Iterating it gives the
    entries so far."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._waiters: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []

    def __call__(
        self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        entry = {**event_dict, "log_level": method}
        self.entries.append(entry)
        for fields, future in self._waiters:
            if not future.done() and _matches(entry, fields):
                future.set_result(entry)
        return event_dict

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.entries)

    def mark(self) -> int:
        """A position in the log, for `wait_for(..., since=...)`."""
        return len(self.entries)

    def find(self, event: str, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        wanted = {"event": event, **fields}
        return [entry for entry in self.entries[since:] if _matches(entry, wanted)]

    async def wait_for(
        self, event: str, timeout_s: float = 10.0, since: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The first matching event logged after position `since`, past or future."""
        if found := self.find(event, since, **fields):
            return found[0]
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = ({"event": event, **fields}, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {event}") from None
        finally:
            self._waiters.remove(entry)


def _matches(entry: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
    return all(entry.get(key) == value for key, value in fields.items())


@contextlib.contextmanager
def watch_logs() -> Iterator[LogWatch]:
    """`structlog.testing.capture_logs()`, with waits: `with watch_logs() as logs:`."""
    watch = LogWatch()
    with structlog.testing.capture_logs(processors=[watch]):
        yield watch
