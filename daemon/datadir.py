"""The data folder, checked before anything starts: a folder the daemon can create files in,
holding a database file it can read and write.

What is wrong is said with the path and the system's reason (a read-only file system, no
permission, a file where the folder should be), as a ConfigError on `daemon.data_dir`: the CLI
exits 78 (EX_CONFIG), which systemd does not restart. A database file that SQLite cannot use
(not a database, corrupt) is a StoreOpenError: exit 65 (EX_DATAERR), not restarted either.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from daemon.config import Config
from daemon.errors import ConfigError

KEY = "daemon.data_dir"


def check_data_dir(config: Config, db_name: str) -> Path:
    """Create `data_dir` if needed and prove it writable; return the database file's path.

    Raises ConfigError naming the config file, `daemon.data_dir` and the reason.
    """
    folder = config.data_dir
    try:
        if folder.exists() and not folder.is_dir():
            raise _Unusable(f"{folder} exists and is not a folder")
        _create(folder)
        _probe_writable(folder)
        db = folder / db_name
        _check_db_file(db)
    except _Unusable as exc:
        raise ConfigError(config.path, KEY, str(exc)) from None
    return db


class _Unusable(Exception):
    pass


def _create(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        missing = next((p for p in reversed(folder.parents) if not p.exists()), folder)
        where = "" if missing == folder else f" (at {missing})"
        raise _Unusable(f"{folder} cannot be created{where}: {_reason(exc)}") from None


def _probe_writable(folder: Path) -> None:
    # Permission bits alone do not tell (root ignores them, a read-only mount does not show in
    # them): create and remove a file, as the database's journal files will be.
    probe = folder / f".lambdaemon-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = None  # left by an earlier process with our pid: creating worked then
    except OSError as exc:
        raise _Unusable(f"{folder} is not writable: {_reason(exc)}") from None
    if fd is not None:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _check_db_file(db: Path) -> None:
    try:
        st = db.lstat()
    except FileNotFoundError:
        return  # created on first start
    except OSError as exc:
        raise _Unusable(f"{db} cannot be examined: {_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Unusable(f"{db} is not a regular file")
    try:
        os.close(os.open(db, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise _Unusable(f"{db} cannot be opened for reading and writing: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
