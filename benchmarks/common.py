"""What every benchmark script shares: HTTP load in rounds beside the bare aiohttp baseline,
percentiles, and writing the figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def loadgen(
    url: str,
    connections: int,
    seconds: float,
    body: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict:
    """One closed-loop HTTP load run (benchmarks/loadgen.py: wrk when installed), POSTing
    `body` (else loadgen's default) with `headers`."""
    command = [
        sys.executable,
        str(HERE / "loadgen.py"),
        url,
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
    ]
    if body is not None:
        command += ["--body", body]
    for name, value in (headers or {}).items():
        command += ["--header", f"{name}:{value}"]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    result: dict = json.loads(out.stdout)
    return result


@contextlib.asynccontextmanager
async def bare_aiohttp() -> AsyncIterator[str]:
    """The baseline server (benchmarks/bare_aiohttp.py) running; yields its URL."""
    async with bare_aiohttp_server() as (url, _):
        yield url


@contextlib.asynccontextmanager
async def bare_aiohttp_server() -> AsyncIterator[tuple[str, int]]:
    """bare_aiohttp(), yielding its URL and its pid (for its CPU: cpu_of)."""
    from tests.daemon_proc import free_port

    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "bare_aiohttp.py"), str(port)
    )
    try:
        await wait_port(port)
        yield f"http://127.0.0.1:{port}/", server.pid
    finally:
        server.terminate()
        await server.wait()


async def wait_port(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)  # polling for the listener, bounded by the timeout


async def paired_rounds(
    url: str, baseline_url: str, connections: int, seconds: float, rounds: int
) -> tuple[dict, dict, float]:
    """Load `url` and the baseline in alternation, `rounds` times each, with both servers up.

    This machine is shared and its speed drifts by tens of percent within a minute, so each
    round of ours is paired with the baseline round right after it. Returns (ours, baseline,
    ratio): the first two with the median of each figure and every round, the ratio as the
    median of the per-round throughput ratios.
    """
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(await asyncio.to_thread(loadgen, url, connections, seconds))
        theirs.append(await asyncio.to_thread(loadgen, baseline_url, connections, seconds))
    ratio = statistics.median(a["rps"] / b["rps"] for a, b in zip(ours, theirs, strict=True))
    return _medians(ours), _medians(theirs), round(ratio, 3)


def ratio_spread(ours: dict, theirs: dict) -> dict[str, float]:
    """The per-round throughput ratios of two paired_rounds results: median, min and max."""
    ratios = [a["rps"] / b["rps"] for a, b in zip(ours["rounds"], theirs["rounds"], strict=True)]
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def _medians(runs: list[dict]) -> dict:
    out = {
        key: round(statistics.median(run[key] for run in runs), 2)
        for key in ("rps", "p50_ms", "p99_ms")
    }
    out["errors"] = sum(run["errors"] for run in runs)
    out["tool"] = runs[0]["tool"]
    out["rounds"] = [
        {key: run[key] for key in ("rps", "p50_ms", "p99_ms", "requests")} for run in runs
    ]
    return out


def spread_ms(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of millisecond samples."""
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p99": round(ordered[max(0, int(len(ordered) * 0.99) - 1)], 2),
        "max": round(ordered[-1], 2),
    }


def report(name: str, results: dict) -> None:
    """Print the figures and keep them as benchmarks/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    (RESULTS / f"{name}.json").write_text(text)
    print(text, end="")


def cpu_of(pid: int) -> dict[str, float]:
    """CPU seconds used so far by process `pid`, split the way the daemon is built.

    `loop`: its main thread, where the event loop runs; `threads`: every other thread of it
    (the store's database threads, the loop's default executor); `children`: its child
    processes alive now (the workers; the benchmarks keep them warm with min_warm, so none
    exits mid-round and takes its CPU with it). `loop_waiting`: seconds the loop thread was
    runnable but waited for a core, which on this 2-core VM tells contention from work.
    From /proc/<pid>/task/<tid>/schedstat (nanoseconds), or stat's clock ticks without it.
    Take it before and after a round (cpu_delta) and divide by the round's events.
    """
    out = {"loop": 0.0, "threads": 0.0, "children": 0.0, "loop_waiting": 0.0, **_machine()}
    for task in Path(f"/proc/{pid}/task").iterdir():
        ran, waited = task_cpu(task)
        if int(task.name) == pid:
            out["loop"], out["loop_waiting"] = ran, waited
        else:
            out["threads"] += ran
    for child in _children(pid):
        with contextlib.suppress(OSError):  # it exited between the listing and the read
            out["children"] += sum(task_cpu(t)[0] for t in Path(f"/proc/{child}/task").iterdir())
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], events: int) -> dict[str, float]:
    """Microseconds of CPU per event between two cpu_of() readings, by part."""
    return {
        key: round((after[key] - before[key]) * 1e6 / max(1, events), 1)
        for key in ("loop", "threads", "children", "loop_waiting")
    }


def machine_share(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Between two cpu_of() readings, the share of all cores' time that was busy (anything on
    the machine: the daemon, the load generator, the broker, other users of this VM) and the
    share the hypervisor gave to other VMs (steal)."""
    total = after["machine_total"] - before["machine_total"]
    return {
        "busy": round((after["machine_busy"] - before["machine_busy"]) / total, 3),
        "steal": round((after["machine_steal"] - before["machine_steal"]) / total, 3),
    }


def _machine() -> dict[str, float]:
    """Seconds of all cores so far from /proc/stat: in total, busy, and stolen."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "machine_total": sum(fields) / tick,
        "machine_busy": (user + nice + system + irq + softirq) / tick,
        "machine_steal": steal / tick,
    }


def task_cpu(task: Path) -> tuple[float, float]:
    """(seconds on a core, seconds runnable but waiting for one) of one thread."""
    try:
        ran, waited, _ = (task / "schedstat").read_text().split()
        return int(ran) / 1e9, int(waited) / 1e9
    except FileNotFoundError:
        fields = (task / "stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 0.0


def _children(pid: int) -> list[int]:
    """Child processes of `pid` (a scan of /proc: the children file needs a kernel option)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def store_commits(base_url: str) -> tuple[float, float]:
    """(group commits so far, seconds they took) from the daemon's GET /metrics."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as resp:
        text = await resp.text()
    found = {}
    for line in text.splitlines():
        for suffix in ("_count", "_sum"):
            if line.startswith(f"lambdaemon_store_commit_duration_seconds{suffix} "):
                found[suffix] = float(line.split()[1])
    return found["_count"], found["_sum"]


def commit_figures(before: tuple[float, float], after: tuple[float, float], events: int) -> dict:
    """Group commits between two store_commits() readings: how many, their mean time, and
    events per commit: with `busy` near 1 the writer thread committed back to back."""
    count, seconds = after[0] - before[0], after[1] - before[1]
    return {
        "commits": int(count),
        "mean_ms": round(seconds / max(1, count) * 1000, 3),
        "events_per_commit": round(events / max(1, count), 1),
        "seconds": round(seconds, 3),
    }
