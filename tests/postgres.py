"""A private PostgreSQL cluster for tests: initdb in a temporary folder, a free loopback port.

    cluster = Postgres()
    cluster.start()           # pg_ctl start -w: returns once it accepts connections
    url = cluster.url(cluster.create_database())   # a fresh, empty database
    cluster.stop()            # and its folder is removed

tests/conftest.py's `pg_cluster` fixture is one cluster for the whole session; `open_store`
opens the store on either backend, for tests parametrized over BACKENDS.

Debian's server binaries (/usr/lib/postgresql/*/bin, installed by tests/run), never the
service that may run on 5432: each session gets its own cluster, superuser and password. The
server refuses to run as root, so as root the cluster's files belong to, and its processes run
as, the `postgres` user the package creates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.mosquitto import free_port

USER = "lambdaemon"
BACKENDS = ("sqlite", "postgresql")
# What a constraint violation raises on either backend.
INTEGRITY_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
with contextlib.suppress(ImportError):
    import psycopg

    INTEGRITY_ERRORS += (psycopg.IntegrityError,)


def bin_dir() -> Path:
    """The newest installed server's bin folder."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError(
            "no PostgreSQL server in /usr/lib/postgresql: apt-get install postgresql"
        )
    return found[-1].parent


class Postgres:
    """One cluster: its own folder, port, superuser `lambdaemon` and password."""

    def __init__(self, *, durable: bool = False) -> None:
        # durable: fsync and full page writes on, as a real server (benchmarks); tests need
        # neither, since the cluster dies with the session.
        self.durable = durable
        self.bin = bin_dir()
        self.port = free_port()
        self.password = uuid.uuid4().hex
        self.directory = Path(tempfile.mkdtemp(prefix="lambdaemon-pg-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.password_file = self.directory / "password"  # for configs: store.password_file
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.directory, "postgres", "postgres")
        self.password_file.write_text(self.password + "\n")

    def _run(self, *argv: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [*self._as, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr}")

    def start(self) -> None:
        pwfile = self.directory / "initdb-password"
        pwfile.write_text(self.password + "\n")
        if self._as:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            f"--pgdata={self.data}",
            f"--username={USER}",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            *(() if self.durable else ("--no-sync",)),  # a test cluster dies with its session
        )
        pwfile.unlink()
        # fsync off: a test cluster need not survive a power cut; synchronous_commit stays on.
        self.pg_ctl("start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(self.bin / "pg_ctl"), "stop", "--wait", "--mode=fast", f"--pgdata={self.data}"
            )
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = USER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def params(self, database: str) -> dict[str, str]:
        """libpq's keywords for `database`, as daemon/credentials.py makes them from a config."""
        return {
            "host": "127.0.0.1",
            "port": str(self.port),
            "user": USER,
            "password": self.password,
            "dbname": database,
            "connect_timeout": "5",
        }

    def pg_ctl(self, action: str) -> None:
        """`stop` (fast: clients are cut off) or `start` the server on its same folder and port."""
        if action == "stop":
            self._run(
                str(self.bin / "pg_ctl"), "stop", "--wait", "--mode=fast", f"--pgdata={self.data}"
            )
            return
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port}"
            f" -c unix_socket_directories={self.directory} -c max_connections=200"
        )
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "start",
            "--wait",
            "--timeout=60",
            f"--pgdata={self.data}",
            f"--log={self.log_path}",
            f"--options={options}",
            timeout=90,
        )

    def connect(self, database: str = "postgres"):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=USER,
            password=self.password,
            dbname=database,
            autocommit=True,
        )

    def create_database(self, template: str = "template0") -> str:
        """A fresh database (CREATE DATABASE ... TEMPLATE is a file copy: fast); its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name


@contextlib.asynccontextmanager
async def open_store(backend: str, db: Path, request: Any) -> AsyncIterator[Any]:
    """The store on `backend`: SQLite at `db`, or a fresh database of the session's cluster
    (pytest's `request` fetches the pg_cluster fixture only then)."""
    if backend == "sqlite":
        from daemon.store.sqlite import Store

        async with Store.open(db) as store:
            yield store
        return
    from daemon.store.pgstore import PgStore

    cluster: Postgres = request.getfixturevalue("pg_cluster")
    database = cluster.create_database()
    async with PgStore.open_url(db.parent, cluster.params(database), database) as pg:
        yield pg


def store_toml(backend: str, request: Any) -> str:
    """The [store] table of a daemon config on `backend`: none for SQLite, else [store] url on a
    fresh database of the session's cluster, its password in the cluster's password file."""
    if backend == "sqlite":
        return ""
    cluster: Postgres = request.getfixturevalue("pg_cluster")
    url = cluster.url(cluster.create_database())
    return f'\n[store]\nurl = "{url}"\npassword_file = "{cluster.password_file}"\n'
