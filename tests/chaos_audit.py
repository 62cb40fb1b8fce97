"""The chaos scenario's audit (tests/chaos.py): every acknowledged event, exactly one record.

Records are matched to events by the payload id each producer put in its events: the MQTT
message's `seq`, the webhook body's `id`, the file's name, the cron event's `time`. The SQLite
file is read read-only (after a clean stop); the handler's own run log (one line per run it
started) is checked against the recorded attempts.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.daemon_proc import SHARED, Daemon

SOURCES = ("mqtt", "webhook", "files", "cron")
CRON_TRIGGER = "chaos_cron#0"


@dataclass
class Accepted:
    """What the sources acknowledged, as the producers saw it."""

    mqtt: list[int] = field(default_factory=list)  # seqs whose PUBACK arrived
    webhook: dict[int, str] = field(default_factory=dict)  # body id -> the 202's invocation id
    files: list[str] = field(default_factory=list)  # every name renamed into the inbox
    webhook_failed: int = 0  # posts refused, reset or cut off: not accepted


@dataclass
class Run:
    """What the scenario saw, beyond the daemon's own files."""

    workdir: Path
    seconds: float
    accepted: Accepted
    first_marker: str | None  # the cron marker before the load began
    settled_marker: str | None  # ... and once everything had settled
    stopped_at: datetime
    kills: list[dict[str, Any]]
    settled_s: float | None  # None: did not settle in time


@dataclass
class Report:
    """What the audit found; `ok` means nothing accepted was lost, doubled or left unfinished."""

    seconds: float
    kills: list[dict[str, Any]]
    events: dict[str, int]  # accepted per source
    records: dict[str, int]  # invocation rows per source
    lost: dict[str, list[Any]]  # accepted payload ids without a record
    duplicates: dict[str, list[Any]]  # payload ids with more than one record
    not_final: list[str]  # records that did not end succeeded
    extra_attempts: int  # sum of (attempt - 1): handler re-runs, all on the same record
    retried_records: int  # records with attempt > 1
    handler_runs: int
    unrecorded_runs: list[str]  # ids that ran more often than their record has attempts
    wrong_ids: list[int]  # a 202 named an invocation id that is not the event's record
    misplaced_files: list[str]  # claimed, but not in done/ under its record's id
    unaccepted_recorded: dict[str, int]  # committed but never acknowledged: allowed, counted
    left_queued_at_stop: int  # cron fires after the settled point that the stop left queued
    cron_lag_s: float  # how far the last cron marker trails the stop
    not_accepted: dict[str, int]  # webhook posts not answered 202, files left in the inbox
    mqtt_redeliveries_matched: int  # DUP copies the daemon mapped to their first record
    settled_s: float | None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            any(self.lost.values())
            or any(self.duplicates.values())
            or self.not_final
            or self.unrecorded_runs
            or self.wrong_ids
            or self.misplaced_files
            or self.settled_s is None
        )

    @property
    def lost_total(self) -> int:
        return sum(map(len, self.lost.values()))

    @property
    def duplicates_total(self) -> int:
        return sum(map(len, self.duplicates.values()))

    def summary(self) -> str:
        events = " ".join(f"{s}={self.events[s]}" for s in SOURCES)
        return (
            f"chaos: {self.seconds:.0f} s, events {events}, kills={len(self.kills)},"
            f" lost={self.lost_total}, duplicate records={self.duplicates_total},"
            f" extra attempts={self.extra_attempts} (on {self.retried_records} records),"
            f" handler runs={self.handler_runs}, not final={len(self.not_final)},"
            f" MQTT redeliveries matched={self.mqtt_redeliveries_matched},"
            f" settled in {self.settled_s} s, wall {self.wall_s} s"
        )


Records = dict[str, dict[Any, list[tuple[str, str, int]]]]  # source -> payload id -> rows


def audit(daemon: Daemon, run: Run) -> Report:
    """Match every accepted event to its records; call after the daemon stopped cleanly."""
    records: Records = {s: {} for s in SOURCES}
    attempts: dict[str, int] = {}
    # A batch's own record (daemon/batches.py) is no event: its items are.
    sql = "SELECT id, function, status, attempt, event FROM invocations WHERE trigger != 'batch'"
    for inv_id, function, status, attempt, event in query(daemon, sql):
        source = function.removeprefix("chaos_")
        key = _payload_id(source, json.loads(event))
        records[source].setdefault(key, []).append((inv_id, status, attempt))
        attempts[inv_id] = attempt
    last_marker = cron_marker(daemon)
    expected = _expected(run, last_marker)
    not_final, left_queued = _unfinished(records, run.settled_marker)
    runs = Counter(line.split()[1] for line in _run_log(run.workdir))
    marker_at = _parse(last_marker) if last_marker else run.stopped_at
    return Report(
        seconds=run.seconds,
        kills=run.kills,
        events={s: len(expected[s]) for s in SOURCES},
        records={s: sum(map(len, records[s].values())) for s in SOURCES},
        lost={s: sorted(expected[s] - set(records[s])) for s in SOURCES},
        duplicates={s: sorted(k for k, r in records[s].items() if len(r) > 1) for s in SOURCES},
        not_final=not_final,
        extra_attempts=sum(a - 1 for a in attempts.values() if a > 1),
        retried_records=sum(1 for a in attempts.values() if a > 1),
        handler_runs=sum(runs.values()),
        # The attempt is committed before the handler starts, so no id runs more often.
        unrecorded_runs=sorted(i for i, n in runs.items() if n > attempts.get(i, 0)),
        wrong_ids=_wrong_ids(run.accepted, records),
        misplaced_files=_misplaced(run.workdir, records, expected["files"]),
        unaccepted_recorded={s: len(set(records[s]) - expected[s]) for s in SOURCES},
        left_queued_at_stop=left_queued,
        cron_lag_s=round((run.stopped_at - marker_at).total_seconds(), 2),
        not_accepted={
            "webhook": run.accepted.webhook_failed,
            "files": len(set(run.accepted.files) - expected["files"]),
        },
        mqtt_redeliveries_matched=sum(
            1 for e in daemon.log_events() if e.get("event") == "mqtt_redelivery_matched"
        ),
        settled_s=run.settled_s,
    )


def query(daemon: Daemon, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the daemon's database read-only (fine while it runs: WAL)."""
    path = daemon.config.parent / "var" / "lambdaemon.db"
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def cron_marker(daemon: Daemon) -> str | None:
    """The last nominal fire the cron trigger committed (or, before any, since when it runs)."""
    sql = "SELECT last_nominal FROM cron_fires WHERE trigger_id = ?"
    try:
        rows = query(daemon, sql, (CRON_TRIGGER,))
    except sqlite3.OperationalError:  # no database or no table yet: the daemon creates both
        return None
    return rows[0][0] if rows else None


def _expected(run: Run, last_marker: str | None) -> dict[str, set[Any]]:
    """The payload ids each source acknowledged: each must have exactly one record."""
    in_inbox = {p.name for p in (run.workdir / "inbox").glob("*.json")}
    return {
        "mqtt": set(run.accepted.mqtt),
        "webhook": set(run.accepted.webhook),
        "files": set(run.accepted.files) - in_inbox,  # claimed: it left the inbox
        "cron": set(_seconds_between(run.first_marker, last_marker)),  # marked fires
    }


def _unfinished(records: Records, settled_marker: str | None) -> tuple[list[str], int]:
    """Records that did not succeed (acknowledged or not); and cron fires the stop left queued."""
    not_final, left_queued = [], 0
    for source in SOURCES:
        for key in sorted(records[source]):
            for inv_id, status, _ in records[source][key]:
                if status == "succeeded":
                    continue
                if source == "cron" and status == "queued" and key > (settled_marker or ""):
                    left_queued += 1  # fired as the stop began; the next start runs it
                    continue
                not_final.append(f"{source}:{key}:{inv_id}:{status}")
    return not_final, left_queued


def _wrong_ids(accepted: Accepted, records: Records) -> list[int]:
    hooks = records["webhook"]
    return sorted(
        n
        for n, inv_id in accepted.webhook.items()
        if n in hooks and inv_id not in {row[0] for row in hooks[n]}
    )


def _misplaced(workdir: Path, records: Records, claimed: set[Any]) -> list[str]:
    done = {p.name for p in (workdir / "inbox" / "done").glob("*_*.json")}
    files = records["files"]
    return sorted(
        name for name in claimed if name in files and f"{files[name][0][0]}_{name}" not in done
    )


def _payload_id(source: str, event: dict[str, Any]) -> Any:
    if source == "mqtt":
        return event["payload"]["seq"]
    if source == "webhook":
        return json.loads(event["body"])["id"]
    if source == "files":
        return event["name"]
    return event["time"]


def _run_log(workdir: Path) -> list[str]:
    path = workdir / SHARED / "runs.log"  # the handlers write it: in their shared folder
    return path.read_text().splitlines() if path.exists() else []


def _parse(iso: str) -> datetime:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _seconds_between(first: str | None, last: str | None) -> list[str]:
    """The per-second nominal times in (first, last], as the cron event's `time` text."""
    if first is None or last is None:
        return []
    t, end, out = _parse(first) + timedelta(seconds=1), _parse(last), []
    while t <= end:
        out.append(t.strftime("%Y-%m-%dT%H:%M:%SZ"))
        t += timedelta(seconds=1)
    return out
