"""Dashboard benchmark: its first page over a store of 100,000 records, and what the page costs
the daemon in memory.

    .venv/bin/python benchmarks/dashboard.py [--records 100000] [--rounds 20]

- First page: the requests the page makes before its table is drawn (the HTML, its four files,
  /ui/session, /v1/functions, /v1/stats?window=1h, /health), timed at the client on loopback
  (server time plus one local round trip each). Reported as the sum of all of them in sequence
  (what a browser that fetched nothing in parallel would wait) over `rounds` rounds, median and
  max, and the first round alone (cold caches). Also the other views' calls: the day's stats,
  the invocation list's first page, the dead letters. Target: first page under 500 ms.
  The 100,000 records are spread over the last 24 hours across 5 functions (5% failed), so the
  hour holds about 4,200 of them and the day all of them.
- Memory: the daemon's RSS idle (after a fresh start and 200 invocations, before any request
  of the dashboard) against its RSS with Debian's headless Chromium showing the overview (the
  hour's stats over the 100,000 records) and then following the live tail while 200 more
  invocations run. Target: within 10 MB of idle.
- The same first page in Chromium: from navigation to the functions table drawn.
Writes benchmarks/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import report  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402

NOOP = HERE / "functions" / "noop"
FUNCTIONS = [f"fn{i}" for i in range(5)]
FIRST_PAGE = [
    "/ui",
    "/ui/static/uplot/uPlot.min.css",
    "/ui/static/app.css",
    "/ui/static/uplot/uPlot.iife.min.js",
    "/ui/static/app.js",
    "/ui/session",
    "/v1/functions",
    "/v1/stats?window=1h",
    "/health",
]
OTHER_VIEWS = ["/v1/stats?window=1d", "/v1/invocations?limit=50", "/v1/dead-letters?limit=200"]


def functions_toml() -> str:
    return "".join(
        f'[functions.{name}]\nhandler = "handler.handler"\ncode = "{NOOP}"\n' for name in FUNCTIONS
    )


def uuid7_at(ms: int, rng: random.Random) -> str:
    h = f"{ms & 0xFFFFFFFFFFFF:012x}{rng.getrandbits(80):020x}"
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def fill(db: Path, records: int) -> None:
    """`records` finished invocations over the last 24 hours, straight into the schema."""
    rng, now = random.Random(7), time.time()
    rows = []
    for _ in range(records):
        queued = now - rng.random() * 86_400
        duration = rng.lognormvariate(1.0, 0.8)
        failed = rng.random() < 0.05
        rows.append(
            (
                uuid7_at(int(queued * 1000), rng),
                rng.choice(FUNCTIONS),
                "$LATEST",
                "api",
                "api",
                "sync",
                "failed" if failed else "succeeded",
                1,
                queued,
                queued + 0.001,
                queued + 0.001 + duration / 1000,
                duration,
                max(1, int(duration + 0.999)),
                "RuntimeError" if failed else None,
                b"{}",
                b"null",
                "hello\n",
            )
        )
    rows.sort(key=lambda row: row[0])
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO invocations (id, function, function_version, trigger, trigger_id,"
            " invocation_type, status, attempt, queued_at, started_at, ended_at, duration_ms,"
            " billed_duration_ms, error_type, event, result, logs)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def timed(daemon: Daemon, path: str) -> float:
    assert daemon.session is not None
    started = time.perf_counter()
    async with daemon.session.get(f"{daemon.base}{path}") as resp:
        await resp.read()
        assert resp.status == 200, (path, resp.status)
    return (time.perf_counter() - started) * 1000


async def page_times(daemon: Daemon, rounds: int) -> dict:
    per_path: dict[str, list[float]] = {path: [] for path in FIRST_PAGE + OTHER_VIEWS}
    totals = []
    for _ in range(rounds):
        total = 0.0
        for path in FIRST_PAGE:
            ms = await timed(daemon, path)
            per_path[path].append(ms)
            total += ms
        totals.append(total)
        for path in OTHER_VIEWS:
            per_path[path].append(await timed(daemon, path))
    return {
        "first_page_total_ms": {
            "first_round": round(totals[0], 1),
            "median": round(statistics.median(totals), 1),
            "max": round(max(totals), 1),
        },
        "per_request_median_ms": {
            path: round(statistics.median(values), 2) for path, values in per_path.items()
        },
        "per_request_first_ms": {path: round(values[0], 2) for path, values in per_path.items()},
    }


def browser():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,860")
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(options=options, service=service)


def wait_for(driver, css: str, text: str | None = None) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):  # type: ignore[no-untyped-def]
        found = d.find_elements(By.CSS_SELECTOR, css)
        return found and (text is None or text in found[0].text)

    WebDriverWait(driver, 30).until(ready)


async def calls(daemon: Daemon, n: int) -> list[str]:
    """`n` sync calls spread over the functions; the ids of fn0's."""
    ids = []
    for i in range(n):
        status, headers, _ = await daemon.invoke(FUNCTIONS[i % len(FUNCTIONS)], {"i": i})
        assert status == 200
        if i % len(FUNCTIONS) == 0:
            ids.append(headers["x-amzn-RequestId"])
    return ids


async def memory(daemon: Daemon) -> dict:
    """RSS idle, with the overview open, and with the tail following while invocations run."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    await calls(daemon, 200)  # warm: every function has a worker, the store its caches
    idle = rss_mb(pid)  # before the dashboard's first request: its files and queries count
    driver = await asyncio.to_thread(browser)
    try:
        started = time.perf_counter()
        await asyncio.to_thread(driver.get, f"{daemon.base}/ui")
        await asyncio.to_thread(wait_for, driver, "#functions tr[data-function=fn0]")
        to_table_ms = (time.perf_counter() - started) * 1000
        overview = rss_mb(pid)
        await asyncio.to_thread(driver.get, f"{daemon.base}/ui#/tail?function=fn0")
        await asyncio.to_thread(wait_for, driver, "#tail-state", "following")
        last = (await calls(daemon, 200))[-1]
        await asyncio.to_thread(wait_for, driver, "#tail-lines", f"END RequestId: {last}")
        tail = rss_mb(pid)
    finally:
        await asyncio.to_thread(driver.quit)
    return {
        "browser_first_page_to_table_ms": round(to_table_ms, 1),
        "rss_mb": {
            "idle": round(idle, 1),
            "overview_open": round(overview, 1),
            "tail_following": round(tail, 1),
            "delta_with_page_and_tail": round(tail - idle, 1),
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), functions_toml()))
        await daemon.start()  # creates the schema
        await daemon.stop()
        started = time.perf_counter()
        fill(Path(tmp) / "var" / "lambdaemon.db", args.records)
        fill_s = time.perf_counter() - started
        results: dict = {"records": args.records, "fill_s": round(fill_s, 1)}
        try:
            await daemon.start()
            results |= await page_times(daemon, args.rounds)
            await daemon.stop()
            await daemon.start()  # memory from a fresh start: nothing of the dashboard loaded
            results |= await memory(daemon)
        finally:
            await daemon.close()
    first = results["first_page_total_ms"]
    results["targets"] = {
        "first page < 500 ms": max(first["first_round"], first["median"]) < 500,
        "RSS within 10 MB of idle": results["rss_mb"]["delta_with_page_and_tail"] <= 10,
    }
    report("dashboard", results)


if __name__ == "__main__":
    asyncio.run(main())
