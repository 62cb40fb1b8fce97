"""History queries on a big store: filtered pages of GET /v1/invocations at 1,000,000 records.

    .venv/bin/python benchmarks/history.py [--records 1000000] [--repeat 60] [--keep DIR]

Setup: a store made by the daemon's own migrations, then RECORDS final records written straight
into it with SQL (one transaction, the daemon not running): 30 days of history, newest now, over
FUNCTIONS functions, with statuses, triggers and versions in realistic shares (mostly
succeeded and $LATEST; some rare). Then the real daemon starts on that file, and each filter
combination below asks for a page of 50 (one asks for 1000) REPEAT times, one request at a
time, through the API over loopback (aiohttp): median and p95 until the whole answer is read
(its JSON is decoded after the clock stops). The
baseline, in the same run and interleaved: the same SELECT (daemon/store/history.py page_sql)
straight on the SQLite file from Python's sqlite3, no HTTP, no JSON; the ratio is API/baseline.
Target: every filtered page of 50 under 50 ms at p95 (the page of 1000 is shown beside).
Writes benchmarks/results/history.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import report  # noqa: E402
from daemon.http.history import parse_history  # noqa: E402
from daemon.store.history import page_sql  # noqa: E402
from daemon.store.sqlite import Store  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402

NOOP = HERE / "functions" / "noop"
FUNCTIONS = 20
SPAN_S = 30 * 86_400
STATUSES = [("succeeded", 0.95), ("failed", 0.03), ("timed_out", 0.01), ("crashed", 0.01)]
TRIGGERS = [("api", 0.5), ("webhook", 0.2), ("mqtt", 0.15), ("cron", 0.1), ("files", 0.05)]
VERSIONS = [("$LATEST", 0.7), ("1", 0.1), ("2", 0.1), ("3", 0.06), ("4", 0.04)]
EVENT = b'{"sensor": "t-17", "value": 21.5, "unit": "C", "at": "2026-12-04T18:00:00Z"}'


def combos(newest_id: str, cursor_after: str) -> dict[str, str]:
    """name -> query string of /v1/invocations."""
    return {
        "first page, no filter": "",
        "function": "function=fn7",
        "status=failed": "status=failed",
        "status=crashed (1%)": "status=crashed",
        "trigger=cron": "trigger=cron",
        "version=3": "version=3",
        "since=1h": "since=1h",
        "since=3d until=2d": "since=3d&until=2d",
        "function+status=failed": "function=fn7&status=failed",
        "function+trigger=files+since=7d": "function=fn7&trigger=files&since=7d",
        "function+status=crashed+version=4 (rare)": "function=fn7&status=crashed&version=4",
        "function, a later page (cursor)": f"function=fn7&cursor={cursor_after}",
        "request id": f"id={newest_id}",
        "no filter, limit=1000": "limit=1000",
    }


def uuid7(ms: int, rand: int) -> str:
    h = f"{ms:012x}{rand:020x}"
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def pick(rng: random.Random, shares: list[tuple[str, float]]) -> str:
    x, total = rng.random(), 0.0
    for value, share in shares:
        total += share
        if x < total:
            return value
    return shares[-1][0]


def rows(n: int, now: float, seed: int = 13):
    rng = random.Random(seed)
    start = now - SPAN_S
    for i in range(n):
        at = start + SPAN_S * i / n  # oldest first, as they would have been written
        status = pick(rng, STATUSES)
        ok = status == "succeeded"
        duration = rng.uniform(0.5, 40.0)
        yield (
            uuid7(int(at * 1000), rng.getrandbits(80)),
            f"fn{rng.randrange(FUNCTIONS)}",
            pick(rng, VERSIONS),
            pick(rng, TRIGGERS),
            "sync" if rng.random() < 0.6 else "async",
            status,
            1,
            at,
            at + 0.0005,
            at + duration / 1000,
            duration,
            max(1, int(duration) + 1),
            None if ok else "Handler.Error",
            None if ok else "something went wrong",
            EVENT,
            b'{"ok": true}' if ok else b'{"errorMessage": "something went wrong"}',
            "START\nEND\n",
        )


def seed_store(db: Path, n: int) -> float:
    """Migrate a new store with the daemon's own code, then write `n` records; seconds taken."""

    async def migrate() -> None:
        async with Store.open(db):
            pass

    asyncio.run(migrate())
    started = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    with contextlib.closing(conn):
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MB: the index inserts stay in memory
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO invocations (id, function, function_version, trigger, invocation_type,"
            " status, attempt, queued_at, started_at, ended_at, duration_ms, billed_duration_ms,"
            " error_type, error_message, event, result, logs)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows(n, time.time()),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.perf_counter() - started


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 2),
    }


def baseline_once(conn: sqlite3.Connection, query: str) -> float:
    parsed, limit = parse_history(QueryParams(query))
    sql, params = page_sql(parsed, limit + 1)
    started = time.perf_counter()
    conn.execute(sql, params).fetchall()
    return (time.perf_counter() - started) * 1000


class QueryParams(dict):
    """A query string as parse_history reads aiohttp's (getall)."""

    def __init__(self, query: str) -> None:
        super().__init__(urllib.parse.parse_qsl(query))

    def getall(self, name: str, default: list[str]) -> list[str]:
        return [self[name]] if name in self else default


async def measure(daemon: Daemon, db_uri: str, repeat: int) -> dict:
    assert daemon.session is not None
    newest = (await daemon.get("/v1/invocations?limit=1"))["invocations"][0]["id"]
    page = await daemon.get("/v1/invocations?function=fn7&limit=50")
    for _ in range(9):  # the 11th page
        page = await daemon.get(f"/v1/invocations?function=fn7&limit=50&cursor={page['next']}")
    conn = sqlite3.connect(db_uri, uri=True)
    out: dict[str, dict] = {}
    with contextlib.closing(conn):
        for name, query in combos(newest, page["next"]).items():
            path = f"/v1/invocations?{query}"
            api, base, count = [], [], 0
            for _ in range(repeat):  # interleaved: both see the same machine state
                started = time.perf_counter()
                async with daemon.session.get(f"{daemon.base}{path}") as resp:
                    raw = await resp.read()
                api.append((time.perf_counter() - started) * 1000)  # the answer, whole
                assert resp.status == 200, raw
                count = len(json.loads(raw)["invocations"])
                base.append(baseline_once(conn, query))
            a, b = stats(api), stats(base)
            out[name] = {
                "query": query,
                "rows": count,
                "api": a,
                "sqlite_baseline": b,
                "ratio": round(a["median_ms"] / max(b["median_ms"], 0.001), 1),
            }
            print(f"{name:45} rows={count:5} api={a} sqlite={b}", flush=True)
    return out


async def run_daemon(config: Path, db_uri: str, repeat: int) -> dict:
    daemon = Daemon(config)
    await daemon.start(timeout_s=120)
    try:
        return await measure(daemon, db_uri, repeat)
    finally:
        await daemon.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=60)
    parser.add_argument("--keep", help="a folder to keep the data in (reused when it has it)")
    args = parser.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="lambdaemon-history-"))
    tmp.mkdir(parents=True, exist_ok=True)
    body = f'[functions.fn7]\nhandler = "handler.handler"\ncode = "{NOOP}"\n'
    # No pruning during the run: the store is the size the benchmark says.
    config = write_config(tmp, body, daemon="retention_days = 0\nmax_db_mb = 16384")
    db = tmp / "var" / "lambdaemon.db"
    results: dict = {"records": args.records, "repeat": args.repeat}
    try:
        if not db.exists():
            db.parent.mkdir(parents=True, exist_ok=True)
            results["seed_s"] = round(seed_store(db, args.records), 1)
        results["db_mb"] = round(db.stat().st_size / 2**20, 1)
        uri = f"{db.resolve().as_uri()}?mode=ro"
        results["pages"] = asyncio.run(run_daemon(config, uri, args.repeat))
        pages = [p for p in results["pages"].values() if "limit=" not in p["query"]]
        worst = max(p["api"]["p95_ms"] for p in pages)
        results["worst_p95_ms_pages_of_50"] = worst
        results["target"] = "every filtered page of 50 under 50 ms (p95)"
        results["met"] = worst < 50
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report("history", results)


if __name__ == "__main__":
    main()
