"""File-drop trigger source: a watched folder, claimed by rename, finished into done/ or failed/.

Per file, in an order that is safe at every instant (a crash anywhere loses nothing):
claim = rename `<path>/<name>` -> `<path>/.processing/<name>` and fsync both folders; commit the
invocation with the dedupe key `files:<dev>:<ino>:<ctime_ns>:<size>:<mtime_ns>:<sha256>:<name>`
(rename keeps the inode, size and mtime and sets ctime, so a claimed file re-found in
.processing/ after a crash maps to the same invocation, while a file moved back into the folder
to be replayed is a new claim); wait for its final status; then rename it to
`done/<invocation_id>_<name>`, `failed/<invocation_id>_<name>` (plus a `.error` JSON sidecar),
or delete it (`after = "delete"`, on success only: a failed input is always kept in failed/).

Rules:
- Non-recursive: only entries directly in `path` count. Folders inside it (.processing, done,
  failed and any other) and their contents are never looked at.
- Ignored names: a leading `.`, a trailing `~`, `.tmp`, `.part`, `.partial`, `.crdownload`.
  `pattern` is a case-sensitive glob on the name. Two triggers on one folder: the first (in
  config order) whose pattern matches gets the file.
- Complete = the kernel says nobody has it open for writing (a read lease can be taken; this
  needs the file's owner or CAP_LEASE). CLOSE_WRITE and MOVED_TO count as complete unless a
  writer is still open. A file found by a scan for which the kernel cannot answer (lease refused,
  or `poll = true`, where remote writers are invisible anyway) must show the same size and mtime
  on two looks at least SETTLE_S apart. A writer that closes and reopens the file can still be
  caught between sessions: producers should write elsewhere and rename into the folder.
- One file per name in flight: a new file with the name of one still in .processing/ waits in
  the folder until that one is finished.
- Only regular files run. A FIFO, socket, device or symlink matching the pattern, and a file
  that cannot be opened or read, is moved to `failed/rejected-<hex>_<name>` with a `.error`.
- Handlers must treat the file as read-only: changing it changes its key, so a crash would
  then run it again under a new invocation.
- Scans: at start (after the watch is in place), on Q_OVERFLOW, when the watch is lost
  (IGNORED: the folder is recreated and watched again), every `rescan_s`, and sooner while a
  file awaits its second look. With `poll = true`, or when no watch can be had, scans only.

Event shapes (`event_format`): "files" (the default) is lambdaemon's own `{path, name, size,
mtime, sha256}`; "s3" is the S3 `ObjectCreated:Put` notification a Lambda handler ported from
an S3 trigger already parses (`s3_event`): the folder's name is the bucket, the file name (form
URL-encoded as S3 does) the key, the content's MD5 the eTag, and the file's local path sits
in an extra `lambdaemon` key of the record, which S3 parsers ignore, since the handler cannot
call S3 for the object.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import signal
import stat
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from asyncinotify import Inotify, Mask
from msgspec import Meta

from daemon.backoff import Backoff
from daemon.errors import ConfigError, StoreUnavailableError
from daemon.metrics import Sample
from daemon.untrusted import is_utf8
from triggers.base import BatchedTriggerSettings, Inputs, Placed, emit_built, printable

if TYPE_CHECKING:
    from daemon.config import Config
    from triggers.base import Emit

log = structlog.get_logger("lambdaemon.triggers.files")

SETTLE_S = 2.0  # stability window for files the kernel cannot vouch for
RETRY_S = (0.5, 30.0)  # backoff of a commit or a final move that failed: first, cap
SIDECAR_SUFFIX = ".error"  # beside a file in failed/: why it failed
CUT_MARK = "…".encode()  # where a name too long for done/ or failed/ lost its middle
FINAL_TAIL_BYTES = 16  # of a long name's end kept after the cut: its extension, most often
IGNORED_SUFFIXES = ("~", ".tmp", ".part", ".partial", ".crdownload")
WATCH_MASK = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.ONLYDIR  # Q_OVERFLOW, IGNORED always come


class FilesTriggerConfig(BatchedTriggerSettings, tag="files", frozen=True):
    path: str
    pattern: str = "*"
    after: Literal["move", "delete"] = "move"
    rescan_s: Annotated[float, Meta(gt=0)] = 60.0
    poll: bool = False  # scan only, for network filesystems where inotify sees nothing
    event_format: Literal["files", "s3"] = "files"

    def check(self, config: Config, key: str) -> None:
        super().check(config, key)
        if "/" in self.pattern or not self.pattern:
            reason = f"{self.pattern!r}: a pattern matches file names, not paths"
            raise ConfigError(config.path, f"{key}.pattern", reason)
        folder = config.resolve(self.path)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(config.path, f"{key}.path", f"{folder} exists and is not a folder")


class _Rejected(Exception):
    """A claimed entry that cannot become an event; the message is the reason."""


@dataclass
class _Folder:
    """One watched folder and the triggers (function, trigger_id, config) that share it."""

    path: Path
    triggers: list[tuple[str, str, FilesTriggerConfig]]
    poll: bool
    rescan_s: float
    looks: dict[str, tuple[tuple[int, int], float]] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)  # names held back by a namesake in flight
    in_flight: int = 0  # claimed files whose invocation is not finished (for GET /metrics)
    rescan: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = "periodic"

    @property
    def processing(self) -> Path:
        return self.path / ".processing"

    def match(self, name: str) -> tuple[str, str, FilesTriggerConfig] | None:
        if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
            return None
        return next((t for t in self.triggers if fnmatch.fnmatchcase(name, t[2].pattern)), None)

    def request_scan(self, reason: str) -> None:
        self.reason = reason
        self.rescan.set()


class FilesSource:
    """Serves every `files` trigger: one watch and scan loop per folder, one task per file."""

    name = "files"
    settings = FilesTriggerConfig

    def __init__(self, config: Config, store: Any, triggers: list[tuple[str, str, Any]]) -> None:
        self._store = store
        self._region = config.daemon.region
        self._sequencer = 0  # last S3 `sequencer` handed out; only ever grows
        self.started = asyncio.Event()
        by_path: dict[Path, list[tuple[str, str, FilesTriggerConfig]]] = {}
        for function, trigger_id, cfg in triggers:
            by_path.setdefault(config.resolve(cfg.path), []).append((function, trigger_id, cfg))
        self._folders = [
            _Folder(path, ts, any(t[2].poll for t in ts), min(t[2].rescan_s for t in ts))
            for path, ts in by_path.items()
        ]

    def samples(self) -> list[Sample]:
        return [
            Sample(name, {"folder": str(folder.path)}, value)
            for folder in self._folders
            for name, value in (
                ("lambdaemon_files_pending", len(folder.looks) + len(folder.waiting)),
                ("lambdaemon_files_processing", folder.in_flight),
            )
        ]

    @staticmethod
    def inputs(config: Config, triggers: list[Placed], secrets: Mapping[str, str]) -> Inputs:
        # Paths are relative to base_dir; the region goes into S3-shaped events.
        return Inputs(restart=(triggers, config.base_dir, config.daemon.region))

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        self.started.set()  # each folder's watch and first scan follow in its own task
        async with asyncio.TaskGroup() as self._tasks:
            for folder in self._folders:
                self._tasks.create_task(self._serve(folder))

    async def _serve(self, folder: _Folder) -> None:
        _make_dir(folder.path)
        _make_dir(folder.processing)
        if not folder.poll:  # the watch goes first, so nothing lands unseen before the scan
            self._watch(folder)
        with os.scandir(folder.processing) as claimed:  # left claimed by an earlier run
            for entry in sorted(claimed, key=lambda e: e.name):
                if not entry.is_dir(follow_symlinks=False):
                    self._tasks.create_task(self._process(folder, entry.name))
        reason = "start"
        while True:
            self._scan(folder, reason)
            settling = bool(folder.looks)  # a file waits for its second look
            wait_s = min(folder.rescan_s, SETTLE_S) if settling else folder.rescan_s
            try:
                async with asyncio.timeout(wait_s):
                    await folder.rescan.wait()
                reason = folder.reason
            except TimeoutError:
                reason = "recheck" if settling else "periodic"
            folder.rescan.clear()

    def _watch(self, folder: _Folder) -> None:
        inotify = None
        try:
            inotify = Inotify()
            inotify.add_watch(folder.path, WATCH_MASK)
        except OSError as exc:  # out of watches or instances: degrade to periodic scans
            if inotify is not None:
                inotify.close()
            log.error("files_watch_failed", folder=str(folder.path), error=str(exc))
            return
        self._tasks.create_task(self._follow(folder, inotify))

    async def _follow(self, folder: _Folder, inotify: Inotify) -> None:
        """inotify as a wake-up only: claim at once on a completion event, rescan when blind."""
        with inotify:  # closed here, by the task that reads it
            async for event in inotify:
                if Mask.Q_OVERFLOW in event.mask:
                    folder.request_scan("overflow")
                elif Mask.IGNORED in event.mask:  # the folder was deleted or unmounted
                    _make_dir(folder.path)
                    inotify.add_watch(folder.path, WATCH_MASK)
                    folder.request_scan("rewatch")
                elif event.name is not None and Mask.ISDIR not in event.mask:
                    self._consider(folder, str(event.name), None, signalled=True)

    def _scan(self, folder: _Folder, reason: str) -> None:
        _make_dir(folder.processing)  # in case someone removed it
        found: list[tuple[int, str, os.stat_result]] = []
        with os.scandir(folder.path) as entries:
            for entry in entries:
                if folder.match(entry.name) and not entry.is_dir(follow_symlinks=False):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime_ns, entry.name, st))
        present = {name for _, name, _ in found}
        folder.looks = {n: look for n, look in folder.looks.items() if n in present}
        claimed = sum(self._consider(folder, name, st) for _, name, st in sorted(found))
        quiet = reason in ("periodic", "recheck") and not claimed
        (log.debug if quiet else log.info)(
            "files_rescanned",
            folder=str(folder.path),
            reason=reason,
            candidates=len(found),
            claimed=claimed,
        )

    def _consider(
        self, folder: _Folder, name: str, st: os.stat_result | None, signalled: bool = False
    ) -> bool:
        """Claim `name` if it matches and is complete; True when claimed."""
        src, dst = folder.path / name, folder.processing / name
        try:
            st = os.lstat(src) if st is None else st
            if not folder.match(name) or stat.S_ISDIR(st.st_mode):
                return False
            if stat.S_ISREG(st.st_mode) and not _complete(folder, name, st, signalled):
                return False
            if os.path.lexists(dst):
                if name not in folder.waiting:
                    log.info("files_deferred", folder=str(folder.path), name=name)
                folder.waiting.add(name)
                return False
            os.rename(src, dst)
        except FileNotFoundError:  # gone already, or .processing was removed (the scan redoes it)
            if os.path.lexists(src):
                folder.request_scan("recheck")
            return False
        except OSError as exc:
            log.error("files_claim_failed", folder=str(folder.path), name=name, error=str(exc))
            return False
        folder.looks.pop(name, None)
        self._tasks.create_task(self._process(folder, name))
        return True

    async def _process(self, folder: _Folder, name: str) -> None:
        """One claimed file, from commit to its final place."""
        folder.in_flight += 1
        try:
            match = folder.match(name)
            try:
                if match is None:
                    raise _Rejected("no files trigger of this folder matches the name any more")
                s3 = match[2].event_format == "s3"
                described = await asyncio.to_thread(_describe, folder, name, s3)
            except _Rejected as exc:
                return await self._reject(folder, name, str(exc), match)
            except OSError as exc:
                reason = f"cannot read: {exc.strerror or exc}"
                return await self._reject(folder, name, reason, match)
            event = described.event
            if s3:
                event = s3_event(described, folder.path.name, match[1], self._region, self._next())
            await self._invoke(folder, name, match, event, described.key)
        except Exception as exc:  # it stays claimed; the next start carries on with it
            log.error(
                "files_processing_failed", folder=str(folder.path), name=name, error=repr(exc)
            )
        finally:
            folder.in_flight -= 1
            if name in folder.waiting:  # a namesake waited for this one to leave .processing
                folder.waiting.discard(name)
                folder.request_scan("recheck")

    def _next(self) -> str:
        """A `sequencer` greater than every earlier one, even if the wall clock steps back."""
        self._sequencer = max(self._sequencer + 1, time.time_ns())
        return f"{self._sequencer:016X}"

    async def _invoke(
        self,
        folder: _Folder,
        name: str,
        match: tuple[str, str, FilesTriggerConfig],
        event: dict[str, Any],
        key: str,
    ) -> None:
        function, trigger_id, cfg = match
        emit = self._emit
        accepted = await _retrying(
            "files_commit_failed",
            name,
            lambda: emit_built(
                emit,
                function,
                lambda: event,  # an event that cannot be JSON is recorded as rejected
                raw=lambda: os.fsencode(name),
                trigger="files",
                trigger_id=trigger_id,
                dedupe_key=key,
                details=lambda: _about(folder, name),
            ),
        )
        invocation_id = accepted.invocation_id
        bound = log.bind(function=function, name=name, invocation_id=invocation_id)
        bound.info("files_claimed", folder=str(folder.path), created=accepted.created)
        status = await emit.wait_final(invocation_id)
        sidecar = None
        if status != "succeeded":
            sidecar = {"name": name, "invocation_id": invocation_id, "function": function}
            sidecar.update(trigger_id=trigger_id, **await self._error_of(invocation_id, status))
        delete = status == "succeeded" and cfg.after == "delete"
        target = await _retrying(
            "files_move_failed",
            name,
            lambda: asyncio.to_thread(_finish, folder, name, invocation_id, sidecar, delete),
        )
        if sidecar is None:
            bound.info("files_done", status=status, moved_to=target)
        else:
            bound.warning("files_failed", status=status, moved_to=target, reason=sidecar["reason"])

    async def _reject(
        self,
        folder: _Folder,
        name: str,
        reason: str,
        match: tuple[str, str, FilesTriggerConfig] | None,
    ) -> None:
        """Record (when a trigger matches) and move to failed/ a file that cannot be an event."""
        invocation_id = None
        if match is not None:
            function, trigger_id, _ = match
            emit, key = self._emit, _rejected_key(folder, name)
            accepted = await _retrying(
                "files_commit_failed",
                name,
                lambda: emit.reject(
                    function,
                    os.fsencode(name),
                    trigger="files",
                    trigger_id=trigger_id,
                    error=reason,
                    dedupe_key=key,
                    details=_about(folder, name),
                ),
            )
            invocation_id = accepted.invocation_id
        sidecar = {"name": name, "invocation_id": invocation_id, "status": "rejected"}
        sidecar["reason"] = reason
        prefix = f"rejected-{invocation_id or uuid.uuid4().hex[:12]}"
        try:
            target = await asyncio.to_thread(_finish, folder, name, prefix, sidecar, False)
        except OSError as exc:  # gone already: nothing left to keep
            target, reason = None, f"{reason}; not moved: {exc.strerror or exc}"
        log.warning(
            "files_rejected",
            folder=str(folder.path),
            name=name,
            reason=reason,
            moved_to=target,
            invocation_id=invocation_id,
        )

    async def _error_of(self, invocation_id: str, status: str) -> dict[str, Any]:
        row = await self._store.error_of(invocation_id) or {}
        return {"status": status, "reason": row.get("error_message") or status, **row}


async def _retrying(event: str, name: str, attempt: Any) -> Any:
    """Retry transient store or disk trouble with capped backoff; the file waits in .processing."""
    backoff = Backoff(*RETRY_S)
    while True:
        try:
            return await attempt()
        except FileNotFoundError:
            raise
        except (StoreUnavailableError, OSError) as exc:
            delay = backoff.next()
            log.error(event, name=name, error=str(exc), retry_in_s=delay)
            await asyncio.sleep(delay)


def _complete(folder: _Folder, name: str, st: os.stat_result, signalled: bool) -> bool:
    writing = _writer_open(folder.path / name)
    if writing:
        folder.looks.pop(name, None)  # its CLOSE_WRITE or a later scan brings it back
        return False
    if not folder.poll and (signalled or writing is False):
        return True
    key, now = (st.st_size, st.st_mtime_ns), time.monotonic()
    seen = folder.looks.get(name)
    if seen is not None and seen[0] == key:
        return now - seen[1] >= SETTLE_S
    folder.looks[name] = (key, now)
    return False


def _writer_open(path: Path) -> bool | None:
    """Whether any process has `path` open for writing; None when the kernel won't say."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # A lease break would signal us with SIGIO, whose default action kills the daemon;
        # SIGURG is ignored by default.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Described:
    """A claimed file: its default event, dedupe key, and what an S3-shaped event adds."""

    event: dict[str, Any]
    key: str
    ctime_ns: int  # set by the claim's rename: when the file arrived, stable across restarts
    md5: str | None  # only when an S3-shaped event needs it as the eTag


def _describe(folder: _Folder, name: str, md5: bool = False) -> _Described:
    """The event and dedupe key of a claimed file (runs in a thread: hashing blocks)."""
    path = folder.processing / name
    if not is_utf8(name):
        raise _Rejected(f"the file name is not valid UTF-8 ({printable(name)})")
    kind = stat.S_IFMT(os.lstat(path).st_mode)
    if kind != stat.S_IFREG:
        raise _Rejected(f"not a regular file ({_KINDS.get(kind, 'unknown type')})")
    # Blocking open: a lease someone else holds is waited out here, in the thread.
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as file:
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped for something else since the lstat
            raise _Rejected("not a regular file")
        sha256, md5_hex = _digests(file, md5)
    _fsync_dir(folder.processing)  # the claim survives a power cut before we commit it
    _fsync_dir(folder.path)
    mtime = datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC).isoformat(timespec="microseconds")
    event = {
        "path": str(path),
        "name": name,
        "size": st.st_size,
        "mtime": mtime.replace("+00:00", "Z"),
        "sha256": sha256,
    }
    identity = (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns, sha256, name)
    key = "files:" + ":".join(map(str, identity))
    return _Described(event, key, st.st_ctime_ns, md5_hex)


def _digests(file: Any, md5: bool) -> tuple[str, str | None]:
    """SHA-256 (the dedupe key's) and, when asked, MD5 (S3's eTag) in one read of the file."""
    if not md5:
        return hashlib.file_digest(file, "sha256").hexdigest(), None
    sha, etag = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    while chunk := file.read(1 << 20):
        sha.update(chunk)
        etag.update(chunk)
    return sha.hexdigest(), etag.hexdigest()


def s3_event(
    described: _Described, bucket: str, trigger_id: str, region: str, sequencer: str
) -> dict[str, Any]:
    """The S3 `ObjectCreated:Put` notification for a claimed file, as S3 sends it to Lambda
    (event version 2.1), plus a `lambdaemon` key with the local path to read it from."""
    plain = described.event
    arrived = datetime.fromtimestamp(described.ctime_ns / 1e9, UTC)
    request_id = hashlib.sha256(described.key.encode()).hexdigest()
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": arrived.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "lambdaemon"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": request_id[:16].upper(),
            "x-amz-id-2": request_id[16:],
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": trigger_id,
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "lambdaemon"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": urllib.parse.quote_plus(plain["name"], safe="/"),
                "size": plain["size"],
                "eTag": described.md5,
                "sequencer": sequencer,
            },
        },
        "lambdaemon": {"path": plain["path"], "sha256": plain["sha256"]},
    }
    return {"Records": [record]}


def _about(folder: _Folder, name: str) -> dict[str, str]:
    """What a rejection record says of the file (as text, even for a name that is not UTF-8)."""
    return {"folder": str(folder.path), "name": printable(name)}


def _rejected_key(folder: _Folder, name: str) -> str | None:
    """The dedupe key of a rejected claim, so a restart before its move records it once."""
    try:
        st = os.lstat(folder.processing / name)
    except OSError:
        return None
    return f"files-rejected:{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}:{printable(name)}"


_KINDS = {
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def _finish(
    folder: _Folder, name: str, prefix: str, sidecar: dict[str, Any] | None, delete: bool
) -> str | None:
    """Delete, or move to done/ (no sidecar) or failed/; return the new path. Blocking."""
    src = folder.processing / name
    if delete:
        os.unlink(src)
        _fsync_dir(folder.processing)
        return None
    dest_dir = folder.path / ("failed" if sidecar else "done")
    _make_dir(dest_dir)
    dest = dest_dir / _final_name(dest_dir, prefix, name, len(SIDECAR_SUFFIX) if sidecar else 0)
    if sidecar:  # written before the move: a crash in between redoes both
        sidecar_path = dest.with_name(dest.name + SIDECAR_SUFFIX)
        _write_durably(sidecar_path, json.dumps(sidecar, indent=1) + "\n")
    os.rename(src, dest)
    _fsync_dir(dest_dir)
    _fsync_dir(folder.processing)
    return str(dest)


def _final_name(dest_dir: Path, prefix: str, name: str, reserve: int) -> str:
    """`<prefix>_<name>`, with `reserve` bytes to spare under the filesystem's limit on a name:
    a name too long for that loses bytes from its middle (its start and extension stay, cut
    between UTF-8 characters). The record and the sidecar keep the whole name."""
    try:
        limit = os.pathconf(dest_dir, "PC_NAME_MAX")
    except OSError:
        limit = 255
    head, raw = os.fsencode(f"{prefix}_"), os.fsencode(name)
    room = limit - reserve - len(head)
    if len(raw) <= room:
        return f"{prefix}_{name}"
    tail_at = max(raw.rfind(b"."), len(raw) - FINAL_TAIL_BYTES)
    tail_at = min(max(tail_at, len(raw) - room // 2), len(raw))  # an extension, never over half
    cut = room - len(CUT_MARK) - (len(raw) - tail_at)
    while 0 < cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
        cut -= 1
    while tail_at < len(raw) and raw[tail_at] & 0xC0 == 0x80:
        tail_at += 1
    return os.fsdecode(head + raw[:cut] + CUT_MARK + raw[tail_at:])


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _make_dir(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
