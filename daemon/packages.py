"""Deployment packages: an uploaded zip, checked and unpacked under its digest, and the folder of
dependencies its requirements.txt asks for.

Both land under `data_dir` by the same discipline: built in a `.tmp-<random>` folder next to their
final place, synced, then renamed. A power cut mid-deploy therefore leaves at most a temporary
folder (collect_garbage removes it), never a half-written folder under a final name; a name that
exists is complete, and the same zip or requirements deployed again reuse it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import hashlib
import io
import os
import shutil
import signal
import stat
import sys
import sysconfig
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon import zips
from daemon.errors import PackageError
from daemon.zips import INVALID, zip_folder

__all__ = [
    "MAX_UNZIPPED_BYTES",
    "MAX_ZIP_BYTES",
    "Package",
    "PackageError",
    "build_environment",
    "collect_garbage",
    "environment_key",
    "store_package",
    "zip_folder",
]

log = structlog.get_logger("lambdaemon.packages")

MAX_ZIP_BYTES = 50 * 1024 * 1024  # Lambda's ZipFile limit
MAX_UNZIPPED_BYTES = 262_144_000  # Lambda's unzipped limit
TOO_LARGE = "RequestTooLargeException"
TMP_PREFIX = ".tmp-"
_PIP_TAIL_LINES = 20
_PIP_TAIL_BYTES = 64 * 1024  # of pip's output kept while it runs; the last lines come from it

# Temporary folders this process is filling right now: collect_garbage leaves them alone (any
# other .tmp-* folder is what a crash left). store_package runs in threads, hence the lock.
_building: set[Path] = set()
_building_lock = threading.Lock()


@dataclass(frozen=True)
class Package:
    """An unpacked deployment package."""

    sha256: str  # Lambda's CodeSha256: base64 of the SHA-256 of the zip bytes (44 characters)
    digest: str  # the same SHA-256 in hex; names the folder
    size: int  # zip bytes
    path: Path  # data_dir/code/<digest>


def store_package(
    zip_bytes: bytes,
    data_dir: Path,
    *,
    max_zip_bytes: int = MAX_ZIP_BYTES,
    max_unzipped_bytes: int = MAX_UNZIPPED_BYTES,
) -> Package:
    """Check a deployment zip and unpack it to data_dir/code/<digest>, or find it there.

    Blocking (it writes and syncs every file): run it in a thread. PackageError for a zip
    Lambda would refuse, and for one that would write, or link, outside its folder.
    """
    if len(zip_bytes) > max_zip_bytes:
        message = (
            f"Zipped size must be smaller than {max_zip_bytes} bytes: "
            f"the zip is {len(zip_bytes)} bytes"
        )
        raise PackageError(TOO_LARGE, message, 413)
    digest = hashlib.sha256(zip_bytes).digest()
    final = data_dir / "code" / digest.hex()
    package = Package(base64.b64encode(digest).decode(), digest.hex(), len(zip_bytes), final)
    if final.is_dir():
        return package
    zips.count_entries(zip_bytes)
    try:
        archive = zipfile.ZipFile(io.BytesIO(zip_bytes))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise zips.unzip_error(str(exc) or type(exc).__name__) from None
    started = time.perf_counter()
    with archive:
        entries = zips.plan(archive.infolist(), max_unzipped_bytes)
        with _temporary(final.parent) as tmp:
            zips.extract(archive, entries, tmp, max_unzipped_bytes)
            _sync_tree(tmp)
            _publish(tmp, final)
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    log.info(
        "package_stored",
        digest=package.digest,
        size=package.size,
        entries=len(entries),
        duration_ms=duration_ms,
    )
    return package


# --- dependencies ------------------------------------------------------------------------------


def environment_key(requirements: bytes) -> str:
    """What names a dependency folder: the requirements, and the interpreter and platform the
    packages were installed for (a wheel with compiled code fits only those)."""
    key = hashlib.sha256(b"lambdaemon-env-1\0")
    for part in (sys.implementation.cache_tag or "", sysconfig.get_platform()):
        key.update(part.encode() + b"\0")
    key.update(f"{sys.version_info[0]}.{sys.version_info[1]}\0".encode())
    key.update(requirements)
    return key.hexdigest()


async def build_environment(
    code: Path, data_dir: Path, wheelhouse: Path | None, *, timeout_s: float = 600
) -> Path | None:
    """The folder of packages `code/requirements.txt` lists, built by pip if not already there:
    data_dir/envs/<key>; None when the code has no requirements.txt.

    With a `wheelhouse`, pip installs from that folder only (offline); otherwise it uses its
    own configuration (the index). PackageError with pip's last lines if it fails or runs past
    `timeout_s` (it is killed, with what it started).
    """
    requirements = code / "requirements.txt"
    if not requirements.is_file():
        return None
    final = data_dir / "envs" / environment_key(requirements.read_bytes())
    if final.is_dir():
        return final
    started = time.perf_counter()
    tmp = _start_temporary(final.parent)
    try:
        await _pip_install(requirements, tmp, wheelhouse, timeout_s)
        await asyncio.to_thread(_sync_tree, tmp)
        _publish(tmp, final)
    finally:
        await asyncio.shield(asyncio.to_thread(_end_temporary, tmp))
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    log.info("environment_built", path=str(final), code=str(code), duration_ms=duration_ms)
    return final


async def _pip_install(
    requirements: Path, target: Path, wheelhouse: Path | None, timeout_s: float
) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    command += ["--no-input", "--target", str(target), "-r", str(requirements)]
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # a build script is user code: only the daemon talks to systemd
    if wheelhouse is not None:
        command += ["--no-index", "--find-links", str(wheelhouse)]
        # The wheelhouse alone: no find-links or index from pip's files or PIP_* variables.
        env = {key: value for key, value in env.items() if not key.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=requirements.parent,  # relative paths in the file are the code's
        env=env,
        start_new_session=True,  # its own group: a kill reaches the builds it started too
    )
    assert proc.stdout is not None
    output = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await proc.stdout.read(_PIP_TAIL_BYTES):
                output += chunk
                del output[:-_PIP_TAIL_BYTES]
            await proc.wait()
    except TimeoutError:
        reason = f"it ran for over {timeout_s:g} s and was stopped"
        raise PackageError(INVALID, _pip_failed(f"{reason}\n{_tail(output)}")) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
    if proc.returncode != 0:
        raise PackageError(INVALID, _pip_failed(_tail(output)))


def _pip_failed(detail: str) -> str:
    return f"pip could not install requirements.txt: {detail.strip()}"


def _tail(output: bytearray) -> str:
    lines = output.decode("utf-8", "replace").rstrip().splitlines()
    return "\n".join(lines[-_PIP_TAIL_LINES:])


# --- the rename discipline ---------------------------------------------------------------------


def _start_temporary(parent: Path) -> Path:
    """A new empty `.tmp-<random>` folder in `parent`, known to collect_garbage as in use."""
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        # its entry too: a power cut must not take the folder, and all it will hold, away
        _sync(parent.parent, os.O_RDONLY | os.O_DIRECTORY)
    path = parent / f"{TMP_PREFIX}{os.urandom(8).hex()}"
    with _building_lock:
        _building.add(path)
    path.mkdir(mode=0o755)
    return path


def _end_temporary(path: Path) -> None:
    """Remove the temporary folder unless it was renamed to its final name."""
    try:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
    finally:
        with _building_lock:
            _building.discard(path)


@contextlib.contextmanager
def _temporary(parent: Path) -> Iterator[Path]:
    path = _start_temporary(parent)
    try:
        yield path
    finally:
        _end_temporary(path)


def _sync_tree(top: Path) -> None:
    """Make what is under `top` durable: one syncfs() of its file system, or else an fsync of
    every file and folder (a package of 100,000 small files takes ~30 s that way, ~1 s the
    other)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs is not None and _syncfs(fd) == 0:
            return
    finally:
        os.close(fd)
    for folder, _, names in os.walk(top):
        for name in names:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                _sync(path, os.O_RDONLY)
        _sync(folder, os.O_RDONLY | os.O_DIRECTORY)


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        syncfs: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    return syncfs


_syncfs = _load_syncfs()


def _sync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder to its final name. If a twin got there first, that one stays
    (the same name is the same content) and ours is dropped with the temporary folder."""
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if not final.is_dir():
            raise OSError(exc.errno, f"cannot rename {tmp} to {final}: {exc.strerror}") from exc
        return
    _sync(final.parent, os.O_RDONLY | os.O_DIRECTORY)


# --- collecting --------------------------------------------------------------------------------


def collect_garbage(data_dir: Path, keep: Iterable[Path], *, min_age_s: float = 0.0) -> list[Path]:
    """Remove what is under data_dir/code and data_dir/envs but not in `keep`, and temporary
    folders a crash left behind; return the paths removed.

    A symlink found there is removed itself, never followed. Entries changed within `min_age_s`
    stay (a package stored but not yet recorded by its caller), and so does a temporary folder
    this process is still filling. Blocking: run it in a thread.
    """
    kept = {os.path.abspath(path) for path in keep}
    removed = []
    now = time.time()
    for folder in (data_dir / "code", data_dir / "envs"):
        for entry in _scan(folder):
            path = Path(entry.path)
            with _building_lock:
                busy = path in _building
            if busy or os.path.abspath(path) in kept:
                continue
            info = entry.stat(follow_symlinks=False)
            if not entry.name.startswith(TMP_PREFIX) and now - info.st_mtime < min_age_s:
                continue
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path, ignore_errors=True)  # unlinks symlinks inside, follows none
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
