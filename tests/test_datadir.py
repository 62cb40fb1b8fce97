"""A data_dir the daemon cannot use stops `lambdaemon run` before anything starts, with the
path and the system's reason: exit 78 (EX_CONFIG) for the folder or the file's access, 65
(EX_DATAERR) for a file that is not a usable database. The real CLI, in a subprocess.

Tests run as root, which permission bits do not stop: "read-only" is a read-only tmpfs mount
(root with CAP_SYS_ADMIN), else the immutable attribute (CAP_LINUX_IMMUTABLE), else, for
anyone else, permission bits.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.datadir import check_data_dir
from tests.daemon_proc import write_config

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def with_data_dir(tmp_path: Path, data_dir: str) -> Path:
    config = write_config(tmp_path, "")
    config.write_text(config.read_text().replace('data_dir = "var"', f'data_dir = "{data_dir}"'))
    return config


def refused(config: Path, code: int, reason: str) -> None:
    result = run(config)
    assert result.returncode == code, result.stderr
    assert reason in result.stderr
    assert "Traceback" not in result.stderr


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[str]:
    """Make the folder or file `path` unwritable even for root; yield the errno text to expect."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield "Permission denied"
        finally:
            path.chmod(mode)
        return
    if path.is_dir() and _ok("mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)):
        try:
            yield "Read-only file system"
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    if not _ok("chattr", "+i", str(path)):
        pytest.fail("cannot make a path read-only as root: no mount, no chattr +i here")
    try:
        yield "Operation not permitted"
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _ok(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0
    except OSError:
        return False


def test_run_refuses_a_read_only_data_dir_with_exit_78(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    (tmp_path / "var").mkdir()
    with read_only(tmp_path / "var") as reason:
        refused(
            config, 78, f"{config}: daemon.data_dir: {tmp_path / 'var'} is not writable: {reason}"
        )


def test_run_refuses_a_data_dir_it_cannot_create_with_exit_78(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    config = with_data_dir(tmp_path, "ro/deeper/var")
    with read_only(tmp_path / "ro") as reason:
        refused(
            config,
            78,
            f"daemon.data_dir: {tmp_path / 'ro/deeper/var'} cannot be created"
            f" (at {tmp_path / 'ro/deeper'}): {reason}",
        )


def test_run_creates_a_missing_parent_of_data_dir(tmp_path: Path) -> None:
    # A folder that can be made is made (systemd's StateDirectory= would do the same).
    config = with_data_dir(tmp_path, "new/parent/var")
    assert check_data_dir(load_config(config), "x.db") == tmp_path / "new/parent/var/x.db"
    assert (tmp_path / "new/parent/var").is_dir()
    assert os.listdir(tmp_path / "new/parent/var") == []  # the write probe is gone


def test_run_refuses_a_data_dir_that_is_a_file_with_exit_78(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    (tmp_path / "var").write_text("not a folder")
    refused(config, 78, f"daemon.data_dir: {tmp_path / 'var'} exists and is not a folder")


def test_run_refuses_a_database_it_cannot_write_with_exit_78(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    (tmp_path / "var").mkdir()
    db = tmp_path / "var" / "lambdaemon.db"
    db.write_bytes(b"")
    with read_only(db) as reason:
        refused(config, 78, f"{db} cannot be opened for reading and writing: {reason}")
    (tmp_path / "var" / "lambdaemon.db").unlink()
    db.mkdir()
    refused(config, 78, f"daemon.data_dir: {db} is not a regular file")


def test_run_refuses_a_file_that_is_not_a_database_with_exit_65(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    (tmp_path / "var").mkdir()
    db = tmp_path / "var" / "lambdaemon.db"
    db.write_bytes(b"this is not SQLite, " * 300)
    refused(config, 65, f"{db}: cannot be opened as lambdaemon's database: file is not a database")
    assert db.read_bytes() == b"this is not SQLite, " * 300  # left as it was
