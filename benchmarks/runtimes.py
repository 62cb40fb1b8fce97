"""Runtimes benchmark: every runtime's warm throughput beside the Python worker, in one run.

    .venv/bin/python benchmarks/runtimes.py [--seconds 3] [--rounds 3]

For a no-op handler under each runtime (python; the same Python function under the sandbox,
`sandbox = true` (daemon/pool/sandbox.py); provided with AWS's `awslambdaric` started from a
bootstrap; nodejs; a Go `provided` bootstrap built here with Debian's Go toolchain):
- warm sync Invoke API throughput at 4 connections (the function's concurrency), in rounds that
  alternate the runtimes, and each round's ratio to the Python worker's round next to it
  (median, min, max) (target: Go >= 0.8x the Python worker);
- CPU per call in those rounds: the daemon's, and its workers' with all they run (median);
- cold start p50 (first invoke of a function with no warm worker);
- idle RSS of one warm worker: the Python worker, or a runtime worker's Runtime API process plus
  its bootstrap; under the sandbox, the worker plus bwrap's two processes (its parent and the
  namespace's init).
Targets: the sandbox costs at most 10% of the Python worker's warm throughput (ratio >= 0.9)
and 30 ms of its cold start.
Needs `go` (golang-go) and `node` (nodejs); a runtime whose tool is missing is left out and said
so. Writes benchmarks/results/runtimes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import loadgen, report, task_cpu  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402

FUNCTIONS = HERE / "functions"
CONCURRENCY = 4
COLD = 5


SANDBOXED = "python_sandbox"


def build(tmp: Path) -> dict[str, tuple[str, Path, str]]:
    """runtime name -> (runtime, code folder, handler), with the code folders that need one
    built or written in `tmp`."""
    runtimes = {"python": ("python", FUNCTIONS / "noop", "handler.handler")}
    runtimes[SANDBOXED] = ("python", FUNCTIONS / "noop", "handler.handler")
    ric = tmp / "ric"
    ric.mkdir()
    shutil.copy(FUNCTIONS / "noop_ric" / "handler.py", ric / "handler.py")
    bootstrap = ric / "bootstrap"
    bootstrap.write_text(f'#!/bin/sh\nexec {sys.executable} -m awslambdaric "$_HANDLER"\n')
    bootstrap.chmod(0o755)
    runtimes["provided_awslambdaric"] = ("provided", ric, "handler.handler")
    if shutil.which("node"):
        runtimes["nodejs"] = ("nodejs", FUNCTIONS / "noop_node", "index.handler")
    else:
        print("no node on PATH: nodejs left out", file=sys.stderr)
    if shutil.which("go"):
        go = tmp / "go"
        go.mkdir()
        env = {**os.environ, "GOCACHE": str(tmp / "gocache"), "CGO_ENABLED": "0"}
        env.setdefault("HOME", str(tmp))
        subprocess.run(
            ["go", "build", "-o", str(go / "bootstrap"), "."],
            cwd=FUNCTIONS / "noop_go",
            env=env,
            check=True,
        )
        runtimes["provided_go"] = ("provided", go, "main.handler")
    else:
        print("no go on PATH: Go left out", file=sys.stderr)
    return runtimes


def functions_toml(runtimes: dict[str, tuple[str, Path, str]]) -> str:
    body = ""
    for name, (runtime, code, handler) in runtimes.items():
        common = f'handler = "{handler}"\ncode = "{code}"\nruntime = "{runtime}"\n'
        common += f"sandbox = {'true' if name == SANDBOXED else 'false'}\n"
        body += f"[functions.{name}]\n{common}concurrency = {CONCURRENCY}\nqueue_size = 1000\n"
        for i in range(COLD):
            body += f"[functions.{name}_cold{i}]\n{common}idle_timeout_s = 0\n"
    return body


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sandbox_rss_mb(name: str) -> float:
    """The RSS of every process of function `name`'s warm worker: bwrap, its init, the worker
    (each carries the function's name in its environment)."""
    mark = f"AWS_LAMBDA_FUNCTION_NAME={name}".encode()
    total = 0.0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and mark in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                total += rss_mb(int(entry))
        except OSError:
            continue
    return total


def cpu_split(daemon_pid: int) -> dict[str, float]:
    """CPU seconds so far of the daemon (every thread) and of all its descendants: the workers,
    and below them bootstraps, bwrap and what handlers started."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            parents[pid] = parent(pid)
            used[pid] = sum(task_cpu(task)[0] for task in Path(f"/proc/{pid}/task").iterdir())
        except (OSError, ValueError):
            continue
    below, found = [daemon_pid], 0.0
    while below:
        pid = below.pop()
        children = [child for child, ppid in parents.items() if ppid == pid]
        found += sum(used.get(child, 0.0) for child in children)
        below += children
    return {"daemon": used.get(daemon_pid, 0.0), "workers": found}


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def measure(daemon: Daemon, names: list[str], seconds: float, rounds: int) -> dict:
    results: dict = {name: {} for name in names}
    for name in names:
        colds = []
        for i in range(COLD):
            started = time.perf_counter()
            status, _, body = await daemon.invoke(f"{name}_cold{i}", {})
            colds.append((time.perf_counter() - started) * 1000)
            assert status == 200, body
        results[name]["cold_start_ms"] = {
            "p50": round(statistics.median(colds), 1),
            "max": round(max(colds), 1),
        }
        status, _, body = await daemon.invoke(name, {})
        assert status == 200, body
        if name == SANDBOXED:  # the pid it sees is its namespace's (2)
            results[name]["idle_rss_mb"] = round(sandbox_rss_mb(name), 1)
            continue
        pid = json.loads(body)["pid"]
        worker = parent(pid)
        total = rss_mb(pid) + (rss_mb(worker) if worker != daemon.proc.pid else 0.0)
        results[name]["idle_rss_mb"] = round(total, 1)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            url = f"{daemon.base}/2015-03-31/functions/{name}/invocations"
            before = cpu_split(daemon.proc.pid)
            run = await asyncio.to_thread(loadgen, url, CONCURRENCY, seconds)
            after = cpu_split(daemon.proc.pid)
            calls = max(1, run["requests"])
            run["cpu_us"] = {key: (after[key] - before[key]) * 1e6 / calls for key in after}
            runs[name].append(run)
    for name in names:
        rps = [run["rps"] for run in runs[name]]
        results[name]["warm_4_connections"] = {
            "rps": round(statistics.median(rps), 1),
            "p50_ms": round(statistics.median(run["p50_ms"] for run in runs[name]), 2),
            "p99_ms": round(statistics.median(run["p99_ms"] for run in runs[name]), 2),
            "errors": sum(run["errors"] for run in runs[name]),
            "rounds_rps": [round(r, 1) for r in rps],
        }
        # CPU per call (median over rounds): the daemon's, and its workers' (with everything
        # they run); less moved by other load on the machine than the throughput is.
        results[name]["cpu_us_per_call"] = {
            key: round(statistics.median(run["cpu_us"][key] for run in runs[name]))
            for key in ("daemon", "workers")
        }
        ratios = [a["rps"] / b["rps"] for a, b in zip(runs[name], runs["python"], strict=True)]
        results[name]["ratio_vs_python"] = {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        }
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = build(Path(tmp))
        # No shared folder: each function as a config gives it, without the tests' write_paths.
        config = write_config(
            Path(tmp), functions_toml(runtimes), daemon="max_workers = 40", shared=False
        )
        daemon = Daemon(config)
        await daemon.start()
        try:
            results = await measure(daemon, list(runtimes), args.seconds, args.rounds)
        finally:
            await daemon.close()
    targets = {}
    sandboxed, python = results[SANDBOXED], results["python"]
    targets["sandbox >= 0.9x the Python worker's warm throughput"] = (
        sandboxed["ratio_vs_python"]["median"] >= 0.9
    )
    cold_cost = sandboxed["cold_start_ms"]["p50"] - python["cold_start_ms"]["p50"]
    sandboxed["cold_start_cost_ms"] = round(cold_cost, 1)
    targets["sandbox adds <= 30 ms to the cold start (p50)"] = cold_cost <= 30
    if "provided_go" in results:
        targets["Go provided >= 0.8x the Python worker"] = (
            results["provided_go"]["ratio_vs_python"]["median"] >= 0.8
        )
    results["targets"] = targets
    report("runtimes", results)


if __name__ == "__main__":
    asyncio.run(main())
