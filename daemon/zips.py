"""Zip files in and out: the checks an uploaded deployment zip must pass, its extraction, and the
deterministic zip of a code folder that `lambdaemon deploy` sends.

packages.py decides where things go; this module only knows the format and its traps (paths
that climb out, symlinks that lead out, sizes that lie, methods that inflate without a bound).
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import PackageError

INVALID = "InvalidParameterValueException"
MAX_ENTRIES = 100_000
MAX_LINK_BYTES = 4095  # a symlink entry's target (PATH_MAX less its NUL)
SKIPPED = frozenset({"__pycache__", ".git", ".venv"})  # folders zip_folder leaves out
_CHUNK_BYTES = 1024 * 1024
# Only what Lambda itself unpacks. bzip2 and lzma also inflate without a bound on the output of
# one read, so a few KiB of them could fill the memory before the size count sees a byte.
_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
_DRIVE = re.compile(r"^[A-Za-z]:")
_CENTRAL_RECORD = b"PK\x01\x02"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can say: every entry gets it
# Errors the zip's names cause rather than the disk: they are the uploader's to fix.
_NAME_ERRORS = {errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST}


def unzip_error(reason: str) -> PackageError:
    return PackageError(INVALID, f"Could not unzip uploaded file: {reason}")


def too_big(size: int, limit: int) -> PackageError:
    return PackageError(
        INVALID, f"Unzipped size must be smaller than {limit} bytes: the zip holds {size} or more"
    )


@dataclass(frozen=True)
class Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]  # the normalised path inside the package
    kind: str  # "file", "dir" or "link"
    mode: int  # permission bits to create it with


def count_entries(data: bytes) -> None:
    """PackageError for a zip of more than MAX_ENTRIES entries, before zipfile reads them.

    zipfile builds an object per central directory record, however many the bytes hold: 50 MB
    of minimal records would be a million of them, hundreds of MB on a small board. Each record
    starts with its signature, so the signatures counted bound what zipfile would build.
    """
    if data.count(_CENTRAL_RECORD) > MAX_ENTRIES:
        raise _too_many()


def _too_many() -> PackageError:
    return PackageError(INVALID, f"the zip has more than {MAX_ENTRIES} entries")


def plan(infos: list[zipfile.ZipInfo], max_unzipped_bytes: int) -> list[Entry]:
    """Every entry checked before a byte is written, in the order to create them: symlinks
    last, so nothing is ever written through one."""
    if len(infos) > MAX_ENTRIES:
        raise _too_many()
    declared = sum(info.file_size for info in infos)
    if declared > max_unzipped_bytes:
        raise too_big(declared, max_unzipped_bytes)
    seen: dict[tuple[str, ...], str] = {}
    entries = [_check(info, seen) for info in infos]
    return sorted(entries, key=lambda entry: entry.kind == "link")


def _check(info: zipfile.ZipInfo, seen: dict[tuple[str, ...], str]) -> Entry:
    """One entry: its path, method and kind; `seen` holds the kinds of the paths before it."""
    name = info.filename
    if "\0" in info.orig_filename:  # zipfile cuts the name there; the uploader meant more
        raise PackageError(INVALID, f"entry {info.orig_filename!r} contains a NUL character")
    parts = _parts(name)
    if info.flag_bits & 0x1:
        raise unzip_error(f"entry {name!r} is encrypted")
    if info.compress_type not in _METHODS:
        raise unzip_error(
            f"entry {name!r} uses compression method {info.compress_type}; "
            "only stored and deflated entries are supported"
        )
    mode = info.external_attr >> 16
    kind = "link" if stat.S_ISLNK(mode) else "dir" if name.endswith("/") else "file"
    if not parts and kind != "dir":
        raise PackageError(INVALID, f"entry {name!r} has no file name")
    for depth in range(1, len(parts)):
        above = seen.setdefault(parts[:depth], "dir")
        if above != "dir":
            where = "/".join(parts[:depth])
            raise PackageError(INVALID, f"entry {name!r} is inside {where!r}, which is a {above}")
    if parts:
        before = seen.get(parts)
        if before is not None and not before == kind == "dir":
            raise PackageError(INVALID, f"entry {name!r} collides with an earlier entry")
        seen[parts] = kind
    return Entry(info, parts, kind, 0o755 if kind == "dir" else 0o644 | (mode & 0o111))


def _parts(name: str) -> tuple[str, ...]:
    """An entry's path as components; PackageError when it could land outside the package."""
    if name.startswith(("/", "\\")):
        raise PackageError(INVALID, f"entry {name!r} has an absolute path")
    if _DRIVE.match(name):
        raise PackageError(INVALID, f"entry {name!r} starts with a drive letter")
    # A backslash is a separator to Windows tools: `..\x` is refused as well as `../x`.
    if ".." in re.split(r"[/\\]", name):
        raise PackageError(INVALID, f"entry {name!r} has a '..' component")
    return tuple(part for part in name.split("/") if part not in ("", "."))


# --- extracting --------------------------------------------------------------------------------


def extract(archive: zipfile.ZipFile, entries: list[Entry], top: Path, limit: int) -> None:
    """Create `entries` under the empty folder `top` (not synced: the caller syncs the tree);
    stop once the bytes really written pass `limit`."""
    written = 0
    for entry in entries:
        path = top.joinpath(*entry.parts)
        try:
            if entry.kind == "dir":
                path.mkdir(mode=0o755, parents=True, exist_ok=True)
                continue
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if entry.kind == "link":
                os.symlink(_link_target(archive, entry), path)
            else:
                written = _write_file(archive, entry, path, written, limit)
        except OSError as exc:
            if exc.errno in _NAME_ERRORS:
                reason = f"entry {entry.info.filename!r}: {exc.strerror}"
                raise PackageError(INVALID, reason) from None
            raise
    _check_links(entries, top)


def _write_file(
    archive: zipfile.ZipFile, entry: Entry, path: Path, written: int, limit: int
) -> int:
    """Copy one entry, counting the bytes it really inflates to (its header may lie)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        with archive.open(entry.info) as source:
            while chunk := source.read(_CHUNK_BYTES):
                written += len(chunk)
                if written > limit:
                    raise too_big(written, limit)
                view = memoryview(chunk)
                while view:  # a write may take less than it was given
                    view = view[os.write(fd, view) :]
        os.fchmod(fd, entry.mode)  # past the umask; never setuid, setgid or sticky
    except PackageError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        # a CRC error, a truncated or corrupt stream: zipfile's words name the entry
        raise unzip_error(str(exc) or f"entry {entry.info.filename!r} is corrupt") from None
    finally:
        os.close(fd)
    return written


def _link_target(archive: zipfile.ZipFile, entry: Entry) -> str:
    name = entry.info.filename
    if entry.info.file_size > MAX_LINK_BYTES:
        raise PackageError(INVALID, f"symlink {name!r} has a target of over {MAX_LINK_BYTES} bytes")
    try:
        with archive.open(entry.info) as source:
            target = os.fsdecode(source.read(MAX_LINK_BYTES + 1))
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise unzip_error(str(exc) or f"entry {name!r} is corrupt") from None
    if not target or "\0" in target or len(os.fsencode(target)) > MAX_LINK_BYTES:
        raise PackageError(INVALID, f"symlink {name!r} has an invalid target {target!r}")
    if target.startswith("/"):
        raise PackageError(INVALID, f"symlink {name!r} points to an absolute path {target!r}")
    resolved = posixpath.normpath(posixpath.join(*entry.parts[:-1], target))
    if resolved == ".." or resolved.startswith("../"):
        raise PackageError(INVALID, f"symlink {name!r} points outside the package: {target!r}")
    return target


def _check_links(entries: list[Entry], top: Path) -> None:
    """Each symlink, resolved through the others, stays inside: the lexical check alone is
    fooled by a chain (`a -> x/..` where `x` is itself a link to `..`)."""
    real_top = os.path.realpath(top)
    for entry in entries:
        if entry.kind == "link":
            link = top.joinpath(*entry.parts)
            real = os.path.realpath(link)
            if real != real_top and not real.startswith(real_top + os.sep):
                raise PackageError(
                    INVALID,
                    f"symlink {entry.info.filename!r} points outside the package: "
                    f"{os.readlink(link)!r}",
                )


# --- making ------------------------------------------------------------------------------------


def zip_folder(folder: Path) -> bytes:
    """A deterministic zip of `folder`: the same files always give the same bytes (and so the
    same CodeSha256). Entries sorted, timestamps fixed, execute bits kept; `__pycache__`,
    `.git`, `.venv` and `*.pyc` left out. ValueError for a symlink that leads outside `folder`
    or something that is neither a file, a folder nor a symlink."""
    top = Path(os.path.realpath(folder))
    if not top.is_dir():
        raise ValueError(f"{folder} is not a folder")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, path in sorted(_walk(top, top)):
            _add(archive, top, name, path)
    return buffer.getvalue()


def _walk(top: Path, folder: Path) -> Iterator[tuple[str, Path]]:
    with os.scandir(folder) as scan:
        entries = list(scan)
    for entry in entries:
        path = Path(entry.path)
        name = path.relative_to(top).as_posix()
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in SKIPPED:
                yield f"{name}/", path
                yield from _walk(top, path)
        elif not entry.name.endswith(".pyc"):
            yield name, path


def _add(archive: zipfile.ZipFile, top: Path, name: str, path: Path) -> None:
    info = zipfile.ZipInfo(name, _EPOCH)
    info.create_system = 3  # Unix, wherever it runs: the mode bits below are read by that rule
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, os.fsencode(_inside_target(top, path)))
    elif stat.S_ISDIR(mode):
        info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10  # 0x10: MS-DOS directory
        archive.writestr(info, b"")
    elif stat.S_ISREG(mode):
        info.external_attr = (stat.S_IFREG | 0o644 | (mode & 0o111)) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with path.open("rb") as source, archive.open(info, "w") as target:
            shutil.copyfileobj(source, target, _CHUNK_BYTES)
    else:
        raise ValueError(f"{path} is not a file, a folder or a symlink")


def _inside_target(top: Path, link: Path) -> str:
    """A symlink's target as a relative path that resolves the same, if it stays in `top`."""
    real = os.path.realpath(link)
    if real != str(top) and not real.startswith(f"{top}{os.sep}"):
        raise ValueError(f"{link} is a symlink to {os.readlink(link)!r}, which is outside {top}")
    return os.path.relpath(real, link.parent)
