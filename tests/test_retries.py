"""Async retries, dead letters, redrive and replay over a real Store, Dispatcher, WorkerPool,
and the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon import lanes
from daemon.config import FunctionConfig
from daemon.dispatcher import Dispatcher
from daemon.models import Outcome, Status
from daemon.pool import WorkerPool
from daemon.retry import after_failure, backoff_s
from daemon.store.sqlite import NewInvocation, Store
from tests.daemon_proc import ROOT, Daemon, Gate, running_daemon, shared_folder, write_config
from tests.waits import until_changed, watch_logs

FLAKY = Path(__file__).resolve().parent / "functions" / "flaky"
ECHO = FLAKY.parent / "echo"
FAST = (0.05, 0.2)  # retry_backoff_s in these tests: first delay and cap


def flaky(name: str = "flaky", **settings: Any) -> FunctionConfig:
    settings = {"retry_backoff_s": FAST, "timeout_s": 5.0, **settings}
    return FunctionConfig(handler="handler.handler", name=name, code=str(FLAKY), **settings)


@contextlib.asynccontextmanager
async def dispatching(db: Path, *fns: FunctionConfig) -> AsyncIterator[tuple[Dispatcher, Store]]:
    """A started Store + WorkerPool + Dispatcher, recovered as the service does it."""
    functions = {fn.name: fn for fn in fns}
    pool = WorkerPool(4)
    async with Store.open(db) as store:
        await pool.start(functions)
        dispatcher = Dispatcher(store, pool, functions)
        try:
            await dispatcher.recover()
            yield dispatcher, store
        finally:
            await dispatcher.drain(5)
            await pool.close()


async def final(dispatcher: Dispatcher, invocation_id: str, timeout_s: float = 15) -> str:
    async with asyncio.timeout(timeout_s):
        return await dispatcher.wait_final(invocation_id)


def events(logs: list[dict[str, Any]], name: str, invocation_id: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name and e.get("invocation_id") == invocation_id]


# --- the policy, as a table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry", "rand", "delay_s"),
    [
        (1, 0.0, 1.0),
        (1, 0.999, 1.4995),
        (2, 0.0, 2.0),
        (3, 0.5, 5.0),
        (6, 0.0, 32.0),
        (7, 0.0, 60.0),
        (7, 0.999, 60.0),
        (500, 0.3, 60.0),
    ],
)
def test_retry_backoff_doubles_with_upward_jitter_up_to_the_cap(retry, rand, delay_s):
    fn = flaky(retry_backoff_s=(1.0, 60.0))
    assert backoff_s(fn, retry, lambda: rand) == pytest.approx(delay_s)


def test_retry_verdicts_count_from_the_redrive_and_bound_the_age():
    fn = flaky(retries=2, retry_backoff_s=(10.0, 10.0), max_event_age_s=100.0)
    at = after_failure(fn, attempt=2, retry_base=0, age_from=0.0, now=50.0, rand=lambda: 0.0)
    assert (at.next_attempt_at, at.dead_letter) == (60.0, None)
    assert after_failure(fn, attempt=3, retry_base=0, age_from=0.0, now=50.0).dead_letter == (
        "RetriesExhausted"
    )
    assert after_failure(fn, attempt=3, retry_base=2, age_from=0.0, now=50.0).next_attempt_at
    # a retry that would only come due after the age limit is not waited for
    late = after_failure(fn, attempt=1, retry_base=0, age_from=0.0, now=95.0, rand=lambda: 0.0)
    assert late.dead_letter == "EventAgeExceeded"


# --- the dispatcher over real workers -------------------------------------------------------------


async def test_retry_then_success_on_the_same_invocation(tmp_path: Path):
    async with dispatching(tmp_path / "db", flaky(retries=2)) as (dispatcher, store):
        with capture_logs() as logs:
            accepted = await dispatcher.accept(
                "flaky",
                {"dir": str(tmp_path / "calls"), "fail": ["raise"]},
                trigger="test",
                trigger_id="test#0",
            )
            # Waiting from before the first attempt ends: the failed attempt must not wake it.
            status = await final(dispatcher, accepted.invocation_id)
        record = await store.get(accepted.invocation_id)
    assert status == "succeeded"
    assert record is not None and (record["status"], record["attempt"]) == ("succeeded", 2)
    first, second = record["attempts"]
    assert (first["status"], first["error_type"], second["status"]) == (
        "failed",
        "RuntimeError",
        "succeeded",
    )
    assert "attempt 1 fails by raise" in first["logs"] and "attempt 2 succeeds" in second["logs"]
    [retry] = events(logs, "invocation_retry_scheduled", accepted.invocation_id)
    assert retry["attempt"] == 1 and FAST[0] <= retry["delay_s"] <= FAST[1]
    # the backoff is respected: scheduled at least the first delay after the failure ended,
    # and the retry did not start before it was due
    assert retry["next_attempt_at"] >= first["ended_at"] + FAST[0]
    assert second["started_at"] >= retry["next_attempt_at"] - 0.001
    assert not events(logs, "invocation_dead_lettered", accepted.invocation_id)


async def test_retries_exhausted_dead_letters_with_every_attempt_recorded(tmp_path: Path):
    fn = flaky(retries=2, timeout_s=0.5)
    async with dispatching(tmp_path / "db", fn) as (dispatcher, store):
        with capture_logs() as logs:
            accepted = await dispatcher.accept(
                "flaky",
                {"dir": str(tmp_path / "calls"), "fail": ["raise", "exit", "hang"]},
                trigger="test",
                trigger_id="test#0",
            )
            status = await final(dispatcher, accepted.invocation_id)
        record = await store.get(accepted.invocation_id)
        dead = await store.list_dead_letters()
    # failed, crashed and timed-out attempts are all retried; the last status is kept
    assert status == "timed_out"
    assert record is not None
    assert [a["status"] for a in record["attempts"]] == ["failed", "crashed", "timed_out"]
    assert (record["status"], record["attempt"], record["dead_letter_reason"]) == (
        "timed_out",
        3,
        "RetriesExhausted",
    )
    assert [d["id"] for d in dead] == [accepted.invocation_id]
    retries = events(logs, "invocation_retry_scheduled", record["id"])
    assert [e["attempt"] for e in retries] == [1, 2]
    [dead_event] = events(logs, "invocation_dead_lettered", record["id"])
    assert (dead_event["reason"], dead_event["status"]) == ("RetriesExhausted", "timed_out")


async def test_max_event_age_dead_letters_instead_of_retrying(tmp_path: Path):
    # the first retry would come 2 s after a 1 s age limit: not worth waiting for
    fn = flaky(retries=2, retry_backoff_s=(2.0, 2.0), max_event_age_s=1.0)
    async with dispatching(tmp_path / "db", fn) as (dispatcher, store):
        accepted = await dispatcher.accept(
            "flaky",
            {"dir": str(tmp_path / "calls"), "fail": ["raise"]},
            trigger="test",
            trigger_id="test#0",
        )
        assert await final(dispatcher, accepted.invocation_id) == "failed"
        record = await store.get(accepted.invocation_id)
    assert record is not None
    assert (record["dead_letter_reason"], record["attempt"]) == ("EventAgeExceeded", 1)


async def test_retry_due_while_down_but_too_old_is_dead_lettered_unrun(tmp_path: Path):
    db, calls = tmp_path / "db", tmp_path / "calls"
    now = time.time()
    async with Store.open(db) as store:  # what a previous run left: a failed attempt, a retry
        await store.insert(
            NewInvocation(
                id="old",
                function="flaky",
                function_version="$LATEST",
                trigger="test",
                invocation_type="async",
                event=json.dumps({"dir": str(calls)}).encode(),
                queued_at=now - 120,
            )
        )
        store.mark_running("old", 1, now - 119, None)
        failed = Outcome(Status.FAILED, b"{}", now - 119, now - 118, 1000.0, error_type="E")
        await store.requeue("old", 1, failed, next_attempt_at=now - 60)
    async with dispatching(db, flaky(max_event_age_s=60.0)) as (dispatcher, store):
        assert await final(dispatcher, "old") == "failed"
        record = await store.get("old")
    assert record is not None
    assert (record["dead_letter_reason"], record["attempt"]) == ("EventAgeExceeded", 1)
    assert not calls.exists()  # the handler never ran again


async def test_waiting_events_past_the_memory_budget_are_read_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Found by tests/test_fuzz.py: a burst of large MQTT messages held every waiting event in
    # the lanes' memory (the daemon reached 370 MB); past the budget they wait in the store.
    monkeypatch.setattr(lanes, "MAX_WAITING_EVENT_BYTES", 10_000)
    echo = FunctionConfig(handler="handler.handler", name="echo", code=str(ECHO))
    async with dispatching(tmp_path / "db.sqlite", echo) as (dispatcher, store):
        sent = {}
        for i in range(30):
            event = json.dumps({"i": i, "pad": "x" * 2000}).encode()
            accepted = await dispatcher.accept("echo", event, trigger="api", trigger_id="api")
            sent[accepted.invocation_id] = json.loads(event)
        budget = dispatcher._lanes.budget
        assert 0 < budget.held <= 10_000  # most of the 60 KB waits in the store only
        for invocation_id, event in sent.items():
            assert await final(dispatcher, invocation_id) == "succeeded"
            record = await store.get(invocation_id)
            assert record is not None and json.loads(record["result"])["event"] == event
        assert budget.held == 0


async def test_sync_invocations_are_never_retried(tmp_path: Path):
    async with dispatching(tmp_path / "db", flaky(retries=2)) as (dispatcher, store):
        event = json.dumps({"dir": str(tmp_path / "calls"), "fail": ["raise"]}).encode()
        with capture_logs() as logs:
            invocation_id, outcome = await dispatcher.invoke_sync("flaky", event, trigger="test")
            await dispatcher.drain(5)  # the record is written after the caller has its answer
        record = await store.get(invocation_id)
    assert outcome.status is Status.FAILED
    assert record is not None
    assert (record["status"], record["attempt"]) == ("failed", 1)
    assert record["dead_letter_reason"] is None
    assert len(record["attempts"]) == 1
    assert not [e for e in logs if e["event"] == "invocation_retry_scheduled"]


async def test_sync_invocation_cancelled_by_its_caller_is_recorded_and_frees_its_slot(
    tmp_path: Path,
):
    # Cancelling the caller ends the run, which is recorded as interrupted, and the function's
    # only slot is free for the next call.
    calls = tmp_path / "calls"
    async with dispatching(tmp_path / "db", flaky(concurrency=1, timeout_s=30.0)) as (
        dispatcher,
        store,
    ):
        hang = json.dumps({"dir": str(calls), "fail": ["hang"]}).encode()
        caller = asyncio.create_task(
            dispatcher.invoke_sync("flaky", hang, trigger="test", invocation_id="gone")
        )
        await until_changed(calls / "gone", (calls / "gone").exists, what="the handler running")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        ok = json.dumps({"dir": str(calls)}).encode()
        _, outcome = await dispatcher.invoke_sync("flaky", ok, trigger="test")
        assert outcome.status is Status.SUCCEEDED
        await dispatcher.drain(5)
        record = await store.get("gone")
    assert record is not None
    assert (record["status"], record["error_type"]) == ("crashed", "Lambdaemon.Interrupted")


async def test_drain_interrupts_a_sync_run_and_its_caller_hears_why(tmp_path: Path):
    calls = tmp_path / "calls"
    async with dispatching(tmp_path / "db", flaky(concurrency=2, timeout_s=30.0)) as (
        dispatcher,
        store,
    ):
        hang = json.dumps({"dir": str(calls), "fail": ["hang"]}).encode()
        callers = [
            asyncio.create_task(
                dispatcher.invoke_sync("flaky", hang, trigger="test", invocation_id=f"hung{i}")
            )
            for i in range(2)
        ]
        await until_changed(
            calls,
            lambda: all((calls / f"hung{i}").exists() for i in range(2)),
            what="both handlers running",
        )
        assert await dispatcher.drain(0.2) == 2
        answers = await asyncio.gather(*callers)  # answered, not cancelled
        records = [await store.get(f"hung{i}") for i in range(2)]
    assert [(i, o.error_type) for i, o in answers] == [
        ("hung0", "Lambdaemon.Interrupted"),
        ("hung1", "Lambdaemon.Interrupted"),
    ]
    assert [r["status"] for r in records if r] == ["crashed", "crashed"]
    assert not any(caller.cancelling() for caller in callers)


# --- the real daemon ------------------------------------------------------------------------------


def _fn_toml(name: str, **settings: Any) -> str:
    lines = [f"[functions.{name}]", 'handler = "handler.handler"', f'code = "{FLAKY}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


async def _record(daemon: Daemon, invocation_id: str) -> dict[str, Any]:
    # The admin API reads after the store's barrier: a check on records made of these holds
    # once the daemon has logged what leads to it (Daemon.wait_logged).
    return await daemon.get(f"/v1/invocations/{invocation_id}")  # type: ignore[no-any-return]


async def _accept(daemon: Daemon, name: str, event: Any) -> str:
    status, headers, _ = await daemon.invoke(name, event, kind="Event")
    assert status == 202
    return headers["x-amzn-RequestId"]


async def test_retry_pending_across_sigkill_runs_on_time_after_restart(tmp_path: Path):
    body = _fn_toml("flaky", retries=2, retry_backoff_s=[2, 2]) + _fn_toml("hang", retries=0)
    daemon = Daemon(write_config(tmp_path, body))
    await daemon.start()
    try:
        calls = str(shared_folder(tmp_path) / "calls")
        retried = await _accept(daemon, "flaky", {"dir": calls, "fail": ["raise"]})
        hung = await _accept(daemon, "hang", {"dir": calls, "fail": ["hang"]})

        async def both_waiting() -> bool:
            r, h = await _record(daemon, retried), await _record(daemon, hung)
            return r["status"] == "queued" and r["attempt"] == 1 and h["status"] == "running"

        await daemon.wait_logged(both_waiting)
        await daemon.kill()
        [scheduled] = [e for e in daemon.log_events() if e["event"] == "invocation_retry_scheduled"]
        await daemon.start()

        record = await daemon.finished(retried, status="succeeded")
        hung_record = await _record(daemon, hung)
    finally:
        await daemon.close()
    assert [a["status"] for a in record["attempts"]] == ["failed", "succeeded"]
    started = _epoch(record["attempts"][1]["started_at"])
    assert started >= scheduled["next_attempt_at"] - 0.01  # waited for its time, not the restart
    # the attempt the kill interrupted is crashed, and with no retries left, dead-lettered
    assert (hung_record["status"], hung_record["dead_letter_reason"]) == (
        "crashed",
        "RetriesExhausted",
    )
    assert hung_record["attempts"][0]["error_type"] == "Lambdaemon.Interrupted"
    recovered = [e for e in daemon.log_events() if e["event"] == "dispatcher_recovered"][-1]
    assert recovered["dead_lettered"] == 1
    # a restart that beat the retry's time left it to a timer (a slower one found it due)
    if _epoch(recovered["timestamp"]) < scheduled["next_attempt_at"]:
        assert recovered["retrying"] == 1


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args, "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


async def test_dead_letters_listed_shown_redriven_and_replayed(tmp_path: Path):
    body = _fn_toml("once", retries=0) + _fn_toml("other", retries=0)
    async with running_daemon(tmp_path, body) as daemon:
        calls = str(shared_folder(tmp_path) / "calls")
        ids = [
            await _accept(daemon, "once", {"dir": calls, "fail": ["raise"], "n": n})
            for n in range(3)
        ]
        other = await _accept(daemon, "other", {"dir": calls, "fail": ["raise"]})

        async def dead(function: str, count: int) -> list[dict[str, Any]] | None:
            rows = (await daemon.get(f"/v1/dead-letters?function={function}"))["dead_letters"]
            return rows if len(rows) == count else None

        rows = await daemon.wait_logged(lambda: dead("once", 3))
        await daemon.wait_logged(lambda: dead("other", 1))
        assert {r["id"] for r in rows} == set(ids)
        assert {(r["status"], r["dead_letter_reason"], r["attempt"]) for r in rows} == {
            ("failed", "RetriesExhausted", 1)
        }

        listed = await asyncio.to_thread(_cli, daemon, "dlq", "list", "--function", "once")
        assert listed.returncode == 0 and all(i in listed.stdout for i in ids)
        assert "RetriesExhausted" in listed.stdout and other not in listed.stdout
        shown = await asyncio.to_thread(_cli, daemon, "dlq", "show", ids[0], "--json")
        assert json.loads(shown.stdout)["event"]["n"] == 0
        missing = await asyncio.to_thread(_cli, daemon, "dlq", "show", "no-such-id")
        assert missing.returncode == 1 and "no dead letter" in missing.stderr

        # redrive one by id: a fresh budget on the same id, and this time it succeeds
        redriven = await asyncio.to_thread(_cli, daemon, "dlq", "redrive", ids[0])
        assert (redriven.returncode, redriven.stdout.split()) == (0, [ids[0]])
        record = await daemon.wait_logged(lambda: _final(daemon, ids[0]))
        assert (record["status"], record["attempt"], record["redrives"]) == ("succeeded", 2, 1)
        assert record["dead_letter_reason"] is None
        shown = await asyncio.to_thread(_cli, daemon, "show", ids[0])
        assert "attempts:" in shown.stdout and "RuntimeError" in shown.stdout

        # redrive all of one function: the other function's dead letter stays
        everything = await asyncio.to_thread(
            _cli, daemon, "dlq", "redrive", "--all", "--function", "once", "--json"
        )
        assert sorted(json.loads(everything.stdout)["redriven"]) == sorted(ids[1:])
        for invocation_id in ids[1:]:
            record = await daemon.wait_logged(lambda i=invocation_id: _final(daemon, i))
            assert record["attempt"] == 2
        assert [r["id"] for r in (await daemon.get("/v1/dead-letters"))["dead_letters"]] == [other]

        # replay: a new invocation with the original event, linked to the old one
        replayed = await asyncio.to_thread(_cli, daemon, "replay", ids[0])
        assert replayed.returncode == 0, replayed.stderr
        new_id = replayed.stdout.strip()
        new = await daemon.wait_logged(lambda: _final(daemon, new_id))
        old = await _record(daemon, ids[0])
        assert (new["parent_id"], new["event"], new["trigger"]) == (ids[0], old["event"], "replay")
        assert new_id != ids[0] and new["invocation_type"] == "async"

        assert (await asyncio.to_thread(_cli, daemon, "replay", "no-such-id")).returncode == 1
        assert (await asyncio.to_thread(_cli, daemon, "dlq", "redrive")).returncode == 64
    names = {e["event"] for e in daemon.log_events()}
    assert {"invocation_redriven", "invocation_replayed", "invocation_dead_lettered"} <= names


async def _final(daemon: Daemon, invocation_id: str) -> dict[str, Any] | None:
    record = await _record(daemon, invocation_id)
    final = record.get("status") in ("succeeded", "failed", "timed_out", "crashed")
    return record if final else None


async def test_dead_letter_api_validates_its_input(tmp_path: Path):
    async with running_daemon(tmp_path, _fn_toml("once", retries=0)) as daemon:
        assert daemon.session is not None
        for payload in ({}, {"ids": ["a"], "all": True}, {"ids": []}, {"all": "yes"}, {"x": 1}):
            async with daemon.session.post(
                f"{daemon.base}/v1/dead-letters/redrive", json=payload
            ) as resp:
                assert resp.status == 400, payload
        async with daemon.session.post(
            f"{daemon.base}/v1/dead-letters/redrive", json={"ids": ["nope"]}
        ) as resp:
            answer = await resp.json()
            assert (resp.status, answer) == (200, {"redriven": [], "not_redriven": ["nope"]})
        async with daemon.session.post(f"{daemon.base}/v1/invocations/nope/replay") as resp:
            assert resp.status == 404
        async with daemon.session.get(f"{daemon.base}/v1/dead-letters?limit=0") as resp:
            assert resp.status == 400


# --- marks written ahead (Dispatcher._mark_ahead) --------------------------------------------------

GATED = FLAKY.parent / "gated"


def gated(**settings: Any) -> FunctionConfig:
    return FunctionConfig(handler="handler.handler", name="gated", code=str(GATED), **settings)


async def test_backlog_marked_running_ahead_runs_each_once_as_its_first_attempt(tmp_path: Path):
    gate = Gate(shared_folder(tmp_path) / "gate")
    async with dispatching(tmp_path / "db", gated(concurrency=1)) as (dispatcher, store):
        with watch_logs() as logs:
            held = await dispatcher.accept(
                "gated", {"gate": str(gate.path)}, trigger="test", trigger_id="t#0"
            )
            await logs.wait_for("invocation_started", invocation_id=held.invocation_id)
            waiting = [
                await dispatcher.accept("gated", {"n": n}, trigger="test", trigger_id="t#0")
                for n in range(3)
            ]
            # The next one started marks the backlog behind it: accepted after the first
            # started, these are marked by the start of the second.
            gate.release()
            for accepted in (held, *waiting):
                assert await final(dispatcher, accepted.invocation_id) == "succeeded"
        for accepted in (held, *waiting):
            record = await store.get(accepted.invocation_id)
            assert record is not None
            assert (record["status"], record["attempt"], len(record["attempts"])) == (
                "succeeded",
                1,
                1,
            )
        assert [e["attempt"] for e in logs.find("invocation_started")] == [1, 1, 1, 1]


async def test_drain_takes_back_the_marks_of_items_that_never_started(tmp_path: Path):
    first, second = (
        Gate(shared_folder(tmp_path) / "first"),
        Gate(shared_folder(tmp_path) / "second"),
    )
    async with dispatching(tmp_path / "db", gated(concurrency=1)) as (dispatcher, store):
        with watch_logs() as logs:
            ids = [
                (
                    await dispatcher.accept("gated", event, trigger="test", trigger_id="t#0")
                ).invocation_id
                for event in (
                    {"gate": str(first.path)},
                    {"gate": str(second.path)},
                    {"n": 1},
                    {"n": 2},
                )
            ]
            await logs.wait_for("invocation_started", invocation_id=ids[0])
            first.release()  # the first finishes; the second starts and holds the lane
            await logs.wait_for("invocation_started", invocation_id=ids[1])
            await store.barrier()
            marked = [await store.get(id) for id in ids[2:]]
            # Written as the second started: the two behind it are `running`, attempt 1.
            assert [(r["status"], r["attempt"]) for r in marked if r] == [("running", 1)] * 2
            await dispatcher.drain(0.2)  # the second is interrupted; the others never started
            await store.barrier()
            back = [await store.get(id) for id in ids[2:]]
        assert [(r["status"], r["attempt"], r["started_at"]) for r in back if r] == [
            ("queued", 0, None)
        ] * 2
        assert logs.find("invocation_marks_taken_back", count=2)
