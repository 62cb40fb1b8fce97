"""The PostgreSQL store: the same Store (daemon/store/sqlite.py), its writer and queries, on a
psycopg 3 connection instead of an SQLite file. Imported only when [store] url is set.

What differs from SQLite, and nothing else does:
- the database thread: each of the two connections (the writer and the reader) runs in its
  own thread, as aiosqlite runs an SQLite connection (aiosqlite.Connection is given a
  connector that opens a psycopg connection behind daemon/store/dialect.py's PgConnection,
  so the store's modules run their SQL unchanged and Store keeps its one-hop calls);
- a batch (PgBatches) is one transaction, as on SQLite: BEGIN, the ops, COMMIT, with the same
  optimistic run and savepoint fallback (daemon/store/batches.py). The session runs with
  `synchronous_commit = on`: a write's future resolves only once the server has flushed its
  COMMIT. A batch of relaxed bookkeeping alone (daemon/store/sqlite.py's docstring) sets
  `synchronous_commit = off` for its own transaction, PostgreSQL's counterpart of SQLite's
  synchronous=NORMAL: it survives the daemon's kill -9 (the server has it), a crash of the
  server may undo it (then the invocation runs again), and the next synchronous commit
  flushes it, since the WAL is written in order. psycopg runs executemany() in pipeline mode;
- migrations: daemon/store/pg_schema.py, at start, behind an advisory lock;
- no file: nothing can replace it (check_file() is None), a checkpoint is the server's business,
  and retention is by age only (daemon/store/retention.py's AgePruner);
- a server that goes away: a write fails with StoreUnavailableError (its source does not
  acknowledge), StoreHealth says "degraded: unreachable", and each connection is opened again
  as soon as the server answers: the writer's before its next batch, the reader's before its
  next statement (PgConnection.ensure).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import psycopg
import structlog
from psycopg import pq

from daemon.errors import StoreUnavailableError
from daemon.store.batches import RELAXED, REPEATABLE, Batches, Write
from daemon.store.dialect import PgConnection
from daemon.store.pg_schema import migrate
from daemon.store.sqlite import Store

log = structlog.get_logger("lambdaemon.store")

# How a psycopg error tells the database cannot take writes now (the server went away, shut
# down, ran out of room...), rather than that one op is wrong: it fails the whole batch.
UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)
_IDLE = pq.TransactionStatus.IDLE
# pg_try_advisory_lock's key that lambdaemon before the fleet took alone, for its one writer
# per database ("lambdaew" in ASCII; pg_schema's is "...ed"). Each node's writer holds it
# shared, so that such a daemon and a fleet never run on one database together.
SOLE_WRITER_LOCK = 0x6C616D6264616577
LOCK_TRIES, LOCK_PAUSE_S = 20, 0.1
T = TypeVar("T")


class PgStore(Store):
    """Store on a PostgreSQL database: `params` are libpq's (daemon/credentials.py)."""

    backend = "postgresql"

    fleet = True  # several nodes may share the database

    def __init__(
        self, data_dir: Path, params: dict[str, str], where: str, node_id: str | None = None
    ) -> None:
        # `path`: a place in data_dir (deployed code lives beside it); nothing is written there.
        super().__init__(Path(data_dir) / "postgresql", node_id)
        self._params = params
        self.where = where  # user@host:port/dbname, for messages (never the password)
        self.schema_version = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open_url(
        cls, data_dir: Path, params: dict[str, str], where: str, node_id: str | None = None
    ) -> AsyncIterator[PgStore]:
        """Connect, migrate and start the store as node `node_id` (default: the host name); on
        exit commit what is queued and close it."""
        store = cls(data_dir, params, where, node_id)
        await store._start()
        try:
            yield store
        finally:
            await store.close()

    async def _start(self) -> None:
        try:
            writer = aiosqlite.Connection(self._connect_writer, 64)  # type: ignore[arg-type]
            self._writer = await writer
            pg: PgConnection = self._writer._conn  # type: ignore[assignment]
            self._batches = PgBatches(pg)
            reader = aiosqlite.Connection(self._connect_reader, 64)  # type: ignore[arg-type]
            self._reader = await reader
        except BaseException:
            await self._close_connections()
            raise
        self._loop = loop = asyncio.get_running_loop()
        self._writer_task = loop.create_task(self._write_loop(), name="store-writer")
        log.info("store_opened", url=self.where, schema_version=self.schema_version)

    def _open(self, *, read_only: bool) -> Any:
        conn = psycopg.connect(**self._params, autocommit=True)  # type: ignore[arg-type]
        # Who this session is: what `node` columns default to, whose rows OWNED means.
        conn.execute("SELECT set_config('lambdaemon.node', %s, false)", (self.node_id,))
        if read_only:
            conn.execute("SET default_transaction_read_only = on")
            return conn
        conn.execute("SET synchronous_commit = on")  # whatever the server's default says
        # One daemon per node id (docs/store.md): a second one would take the first one's
        # running invocations for crashed and run its queue. The writer's session holds this
        # lock for as long as it lives, and takes it again when it connects again after an
        # outage. A few tries: the session of a daemon just killed may take a moment to end.
        try:
            self._lock(conn, "pg_try_advisory_lock_shared", SOLE_WRITER_LOCK, "")
            self._lock(
                conn,
                "pg_try_advisory_lock",
                node_lock(self.node_id),
                f"another lambdaemon with node_id {self.node_id!r} is running on {self.where}:"
                " each node of a fleet needs its own ([daemon] node_id)",
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def _lock(self, conn: Any, function: str, key: int, refusal: str) -> None:
        for _ in range(LOCK_TRIES):
            row = conn.execute(f"SELECT {function}(%s)", (key,)).fetchone()
            if row is not None and row[0]:
                return
            time.sleep(LOCK_PAUSE_S)
        raise StoreUnavailableError(
            refusal
            or f"a lambdaemon of an earlier release (one daemon per database) is running on"
            f" {self.where}: stop it before starting a fleet's node"
        )

    def _connect_writer(self) -> PgConnection:
        # In the writer's thread: connect and migrate before the first batch.
        raw = self._open(read_only=False)
        try:
            self.schema_version = migrate(raw, self.where)
        except BaseException:
            raw.close()
            raise
        return PgConnection(raw, partial(self._open, read_only=False))

    def _connect_reader(self) -> PgConnection:
        opener = partial(self._open, read_only=True)
        return PgConnection(opener(), opener, reconnect_on_execute=True)

    async def query(self, sql: str, params: Any = ()) -> list[Any]:
        """Store.query; a server that cannot be reached is StoreUnavailableError, as a write's."""
        rows: list[Any] = await self._again(partial(Store.query, self, sql, params))
        return rows

    async def _read(self, fn: Callable[..., T]) -> T:
        result: T = await self._again(partial(Store._read, self, fn))
        return result

    async def _again(self, read: Callable[[], Any]) -> Any:
        # A read is its own transaction, so one that found its connection lost (the server
        # restarted since the last read: nothing told the idle connection) runs once more on
        # a new one; a second failure means the server is away.
        for tries_left in (1, 0):
            try:
                return await read()
            except UNAVAILABLE as exc:
                if not tries_left:
                    raise StoreUnavailableError(f"store {self.where}: {exc}") from exc
        raise AssertionError("unreachable")

    async def checkpoint(self) -> bool:
        """Nothing to do: the server checkpoints its own WAL."""
        return False

    def check_file(self) -> str | None:
        return None


def node_lock(node_id: str) -> int:
    """pg_try_advisory_lock's key for `node_id`'s writer: 64 bits of a hash of it, signed."""
    digest = hashlib.blake2b(f"lambdaemon node {node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PgBatches(Batches):
    """Batches (daemon/store/batches.py) on PostgreSQL: the same rules, PostgreSQL's statements.

    A statement that fails aborts the whole transaction on PostgreSQL, so the optimistic run
    (no savepoints) rolls back on any op's error and the batch runs again with a savepoint per
    op, where only that op fails; an UNAVAILABLE error fails the batch either way.
    """

    def __init__(self, conn: PgConnection) -> None:
        self._pg = conn
        self._synchronous = "on"
        self.reruns = 0

    def run(self, ops: list[Write]) -> list[tuple[bool, Any]]:
        conn = self._pg
        conn.ensure()  # between transactions: a connection lost in an outage is opened again
        relaxed = all(op.flags & RELAXED for op in ops)
        # One round trip for both: a simple query of two statements.
        begin = "BEGIN; SET LOCAL synchronous_commit = off" if relaxed else "BEGIN"
        if all(op.flags & REPEATABLE for op in ops):
            try:
                with _transaction(conn, begin):
                    return [(True, _run_bare(conn, op)) for op in ops]
            except _OpFailed:
                self.reruns += 1
        with _transaction(conn, begin):
            return [_run_in_savepoint(conn, op) for op in ops]


class _OpFailed(Exception):
    """An op of an optimistic batch failed: the batch is rolled back and run op by op."""


@contextlib.contextmanager
def _transaction(conn: PgConnection, begin: str) -> Any:
    raw = conn.raw
    raw.execute(begin)
    try:
        yield
        raw.execute("COMMIT")
    except BaseException:
        if not raw.closed and raw.info.transaction_status != _IDLE:
            with contextlib.suppress(psycopg.Error):
                raw.execute("ROLLBACK")
        raise


def _run_bare(conn: PgConnection, op: Write) -> Any:
    try:
        return op(conn)
    except UNAVAILABLE:
        raise
    except Exception as exc:
        raise _OpFailed from exc


def _run_in_savepoint(conn: PgConnection, op: Write) -> tuple[bool, Any]:
    raw = conn.raw
    raw.execute("SAVEPOINT op")
    try:
        result = op(conn)
    except UNAVAILABLE:
        raise
    except Exception as exc:
        raw.execute("ROLLBACK TO SAVEPOINT op")
        raw.execute("RELEASE SAVEPOINT op")
        return False, exc
    raw.execute("RELEASE SAVEPOINT op")
    return True, result
