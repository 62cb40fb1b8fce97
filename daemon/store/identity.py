"""Whether the store's path still names the database file the store opened.

SQLite keeps writing to the file it opened, by descriptor, even after that file was deleted or
another one was moved to its path: every commit then succeeds into an inode that nothing will
ever read again, and the next start finds none of it. So the store remembers the device and inode
of the database file and of its WAL at open, and looks again after every commit, before anyone
is told "stored" (two stat() calls), and once a second from the health check. A change is final:
SQLite cannot be pointed at a new file under an open connection, and writing on into the old one
would only acknowledge more that is lost, so the store refuses every write until the daemon
restarts.
"""

from __future__ import annotations

import os
from pathlib import Path

FileId = tuple[int, int]  # (st_dev, st_ino)


class FileIdentity:
    """The database file and WAL the store opened, by device and inode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wal_path = Path(f"{path}-wal")
        self._db = _file_id(path)
        # Absent only if nothing was ever read (SQLite creates it with the first transaction);
        # then there is nothing of ours in a WAL to lose, and only the database file is watched.
        self._wal = _file_id(self._wal_path)

    def changed(self) -> str | None:
        """What no longer matches (None: both files are the ones opened)."""
        for path, opened in ((self.path, self._db), (self._wal_path, self._wal)):
            if opened is None:
                continue
            now = _file_id(path)
            if now is None:
                return f"{path} was deleted"
            if now != opened:
                return f"{path} was replaced by another file"
        return None


def _file_id(path: Path) -> FileId | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
