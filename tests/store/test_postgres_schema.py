"""The PostgreSQL schema (daemon/store/pg_schema.py) against a private cluster: it has SQLite's
tables and columns, migrates once however many nodes start at once, refuses a newer schema, and
its usage trigger counts an attempt as SQLite's does."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from daemon.errors import StoreUnavailableError
from daemon.store.migrations import MIGRATIONS
from daemon.store.pg_schema import PG_MIGRATIONS, migrate, schema_version
from tests.postgres import Postgres


@pytest.fixture
def cluster(pg_cluster: Postgres) -> Postgres:
    return pg_cluster  # the session's (tests/conftest.py)


@pytest.fixture
def pg(cluster):  # type: ignore[no-untyped-def]
    with cluster.connect(cluster.create_database()) as conn:
        yield conn


def sqlite_store() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statements in MIGRATIONS:
        for sql in statements:
            conn.execute(sql)
    return conn


def test_the_schema_has_sqlites_tables_and_columns(pg):
    assert migrate(pg, "test") == len(PG_MIGRATIONS) == 2
    lite = sqlite_store()
    tables = [r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    expected = {t: {r[1] for r in lite.execute(f"PRAGMA table_info({t})")} for t in tables}
    expected["invocations"].add("seq")  # SQLite's rowid, made a column
    expected["lambdaemon_schema"] = {"id", "version"}  # SQLite's PRAGMA user_version
    found: dict[str, set[str]] = {}
    for table, column in pg.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public'"
    ):
        found.setdefault(table, set()).add(column)
    assert found == expected


def test_migrating_again_changes_nothing_and_a_newer_schema_is_refused(pg):
    migrate(pg, "test")
    assert migrate(pg, "test") == schema_version(pg) == 2
    pg.execute("UPDATE lambdaemon_schema SET version = 99")
    with pytest.raises(StoreUnavailableError) as caught:
        migrate(pg, "db.local/fleet")
    assert str(caught.value) == (
        "db.local/fleet: schema version 99 is newer than this lambdaemon knows (2);"
        " upgrade lambdaemon or use another database"
    )
    assert schema_version(pg) == 99  # never migrated down


def test_nodes_starting_at_once_migrate_once(cluster):
    db = cluster.create_database()
    results: list[object] = []

    def start() -> None:
        try:
            with cluster.connect(db) as conn:
                results.append(migrate(conn, "test"))
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [2, 2, 2, 2]


INVOCATION = (
    "INSERT INTO invocations (id, function, function_version, trigger, invocation_type, status,"
    " queued_at, event, batch_id) VALUES ({p}, 'fn', '$LATEST', 'api', 'async', 'succeeded',"
    " 0, {p}, {p})"
)
ATTEMPT = (
    "INSERT INTO attempts (invocation_id, attempt, status, started_at, ended_at, duration_ms,"
    " batch_id) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})"
)
ATTEMPTS = [
    # id, attempt, status, started, ended, duration_ms, the attempt's batch
    ("a", 1, "failed", 86_400 * 3 + 5, 86_400 * 3 + 6, 12.3, None),
    ("a", 2, "succeeded", 86_400 * 3 + 9, 86_400 * 3 + 9.5, 0.2, None),
    ("b", 1, "running", 86_400 * 3, None, None, None),  # counts nothing yet
    ("c", 1, "crashed", 86_400 * 4, None, None, None),  # interrupted: one request, billed 0
    ("batch", 1, "succeeded", 86_400 * 4, 86_400 * 4 + 1, 40.0, "batch"),
    ("item", 1, "succeeded", 86_400 * 4, 86_400 * 4 + 1, 40.0, "batch"),  # the batch's
]


def usage_rows(conn, placeholder: str, upsert: str) -> list[tuple[object, ...]]:  # type: ignore[no-untyped-def]
    p = placeholder
    conn.execute("INSERT INTO usage_memory (function, memory_mb) VALUES ('fn', 256)")
    for id, batch in (("a", None), ("b", None), ("c", None), ("batch", "batch"), ("item", "batch")):
        conn.execute(INVOCATION.format(p=p), (id, b"{}", batch))
    for row in ATTEMPTS:
        conn.execute(upsert.format(p=p), row)
        conn.execute(upsert.format(p=p), row)  # written twice: counted once
    return [
        tuple(r)
        for r in conn.execute(
            "SELECT day, function, requests, errors, duration_ms, billed_ms, mb_ms"
            " FROM usage_daily ORDER BY day"
        ).fetchall()
    ]


def test_the_usage_trigger_counts_as_sqlites_does(pg):
    migrate(pg, "test")
    lite = usage_rows(sqlite_store(), "?", ATTEMPT.replace("INSERT", "INSERT OR REPLACE", 1))
    upsert = ATTEMPT + (
        " ON CONFLICT (invocation_id, attempt) DO UPDATE SET status = excluded.status,"
        " started_at = excluded.started_at, ended_at = excluded.ended_at,"
        " duration_ms = excluded.duration_ms"
    )
    found = usage_rows(pg, "%s", upsert)
    assert found == [
        (3, "fn", 2, 1, pytest.approx(12.5), 14, 14 * 256),
        (4, "fn", 2, 1, 40.0, 40, 40 * 256),
    ]
    assert found == lite
