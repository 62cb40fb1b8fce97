"""The store modules' own functions, run on both backends: SQLite as the daemon runs it, and
PostgreSQL through daemon/store/dialect.py on a fresh database of a private cluster. Each test
runs once per backend and expects the same results."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from daemon.models import Outcome, Status
from daemon.store import cron, deploys, outbox, records
from daemon.store.batches import prepare_writer
from daemon.store.dialect import PgConnection, translate
from daemon.store.pg_schema import migrate
from daemon.store.records import NewInvocation
from tests.postgres import Postgres


@pytest.fixture
def cluster(pg_cluster: Postgres) -> Postgres:
    return pg_cluster  # the session's (tests/conftest.py)


@pytest.fixture(params=["sqlite", "postgresql"])
def conn(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        lite = sqlite3.connect(tmp_path / "lambdaemon.db", isolation_level=None)
        lite.row_factory = sqlite3.Row
        prepare_writer(lite, tmp_path / "lambdaemon.db")
        yield lite
        lite.close()
        return
    cluster = request.getfixturevalue("cluster")
    with cluster.connect(cluster.create_database()) as raw:
        migrate(raw, "test")
        yield PgConnection(raw)


def new(id: str, *, dedupe: str | None = None, **kw: object) -> NewInvocation:
    return NewInvocation(
        id=id,
        function=str(kw.pop("function", "fn")),
        function_version="$LATEST",
        trigger="api",
        invocation_type="async",
        event=b'{"n": 1}',
        queued_at=float(kw.pop("queued_at", 1000.0)),
        dedupe_key=dedupe,
        **kw,  # type: ignore[arg-type]
    )


def outcome(status: Status = Status.SUCCEEDED, duration_ms: float = 2.5) -> Outcome:
    return Outcome(
        status=status,
        payload=b'"ok"',
        started_at=86_400 * 5 + 1,
        ended_at=86_400 * 5 + 2,
        duration_ms=duration_ms,
        worker_pid=4242,
        logs="line\n",
    )


def test_an_idempotency_key_is_stored_once(conn):
    assert records.insert(conn, new("a", dedupe="mqtt:1")) == ("a", True)
    assert records.insert(conn, new("b", dedupe="mqtt:1")) == ("a", False)
    assert records.insert(conn, new("c")) == ("c", True)
    rows = conn.execute(records.DEDUPE_KEYS_IN, ("mqtt:", "mqtt;")).fetchall()
    assert [r[0] for r in rows] == ["mqtt:1"]


def test_a_cron_fire_is_marked_with_its_invocation_and_only_once(conn):
    fire = ("heartbeat#0", "2026-12-04T22:00:00Z")
    assert cron.insert_fire(conn, new("a", dedupe="cron:x"), fire) == ("a", True)
    later = ("heartbeat#0", "2026-12-04T22:01:00Z")
    assert cron.insert_fire(conn, new("b", dedupe="cron:x"), later) == ("a", False)
    assert conn.execute(cron.LAST_FIRE, ("heartbeat#0",)).fetchone()[0] == fire[1]


def test_the_outbox_gives_ids_and_skips_blocked_channels(conn):
    first = outbox.add(conn, "a", 1, "success", "mqtt", "t/1", b"{}", 1.0)
    assert isinstance(first, int)
    assert outbox.add(conn, "a", 1, "success", "mqtt", "t/1", b"{}", 1.0) is None
    second = outbox.add(conn, "b", 1, "failure", "webhook", "http://x/", b"{}", 2.0)
    assert second is not None and second > first
    due = conn.execute(outbox.DUE, ('["mqtt"]', 10)).fetchall()
    assert [(r[0], r["target"]) for r in due] == [(second, "http://x/")]
    outbox.attempted(conn, second, "refused", 3.0, final=True)
    assert conn.execute(outbox.DUE, ("[]", 10)).fetchall()[0][0] == first
    assert dict(conn.execute(outbox.COUNTS).fetchall()) == {"pending": 1, "failed": 1}


def test_a_finished_record_and_its_attempt_are_written_once(conn):
    inv = new("s", attempt=1, status=Status.RUNNING, started_at=86_400 * 5 + 1)
    records.insert_finished(conn, inv, outcome())
    records.record_attempt(conn, "s", 1, outcome())  # repeated after an ambiguous commit
    record = records.fetch_record(conn, "s")
    assert record is not None
    assert (record["status"], record["billed_duration_ms"], bytes(record["result"])) == (
        "succeeded",
        3,
        b'"ok"',
    )
    assert [(a["attempt"], a["status"], a["logs"]) for a in record["attempts"]] == [
        (1, "succeeded", "line\n")
    ]
    usage = conn.execute("SELECT day, requests, billed_ms, mb_ms FROM usage_daily").fetchall()
    assert [tuple(r) for r in usage] == [(5, 1, 3, 3 * 128)]


def test_a_dead_letter_is_redriven_with_a_fresh_budget(conn):
    for id in ("a", "b"):
        records.insert(conn, new(id, queued_at=10.0 if id == "a" else 20.0))
        conn.execute(
            "UPDATE invocations SET status = 'failed', attempt = 3,"
            " dead_letter_reason = 'RetriesExhausted', dead_lettered_at = 30 WHERE id = ?",
            (id,),
        )
    queued = records.redrive(conn, None, None, ["fn"], 40.0)
    assert [(q.id, q.attempt, q.retry_base, q.age_from) for q in queued] == [
        ("a", 3, 3, 40.0),
        ("b", 3, 3, 40.0),
    ]
    assert records.redrive(conn, ["a"], None, ["fn"], 50.0) == []  # no longer a dead letter


def test_a_version_counter_never_goes_back(conn):
    code = deploys.Code(sha256="x=", size=1, path="/code/x")
    settings = deploys.Settings(handler="handler.handler", timeout_s=3.0, memory_mb=128)
    for number in (1, 3, 2):
        change = deploys.Change(function="fn", at=float(number), action="publish", actor="t")
        version = deploys.Version("fn", number, code, settings, "", float(number), f"r{number}")
        deploys.save_version(conn, version, change)
    state = deploys.load(conn)
    assert state.counters == {"fn": 3}
    assert [v.number for v in state.versions] == [1, 2, 3]
    rows = conn.execute(deploys.HISTORY, ("fn", 1 << 62, 10)).fetchall()
    history = deploys.history_rows(rows)
    assert [c.at for c in history] == [2.0, 3.0, 1.0]  # newest first: by id, as written
    assert history[0].id is not None and history[0].id > history[-1].id


def test_translate_rewrites_what_the_dialects_spell_differently():
    assert translate("SELECT a FROM t WHERE b = ? AND c LIKE 'x%' AND d = :d") == (
        "SELECT a FROM t WHERE b = %s AND c LIKE 'x%%' AND d = %(d)s",
        False,
    )
    sql, returns_id = translate(
        "INSERT OR REPLACE INTO attempts (invocation_id, attempt, status) VALUES (?, ?, ?)"
    )
    assert sql == (
        "INSERT INTO attempts (invocation_id, attempt, status) VALUES (%s, %s, %s)"
        " ON CONFLICT (invocation_id, attempt) DO UPDATE SET status = excluded.status"
    )
    assert translate("INSERT INTO outbox (a) VALUES (?)")[1] is True
    assert translate("SELECT max(a), max(a, b), min(x,y) FROM t ORDER BY rowid")[0] == (
        "SELECT max(a), greatest(a, b), least(x,y) FROM t ORDER BY seq"
    )


def test_memory_sizes_are_rewritten_only_when_they_change(conn):
    from daemon.store import usage

    usage.save_memory(conn, {"fn": 256, "other": 128})
    usage.save_memory(conn, {"fn": 512, "other": 128})
    rows = conn.execute("SELECT function, memory_mb FROM usage_memory ORDER BY function")
    assert [tuple(r) for r in rows.fetchall()] == [("fn", 512), ("other", 128)]
