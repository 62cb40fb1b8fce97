"""Compare this tree with an earlier commit on the benchmarks that measure a ratio to bare aiohttp.

    .venv/bin/python benchmarks/compare.py --base 969f356 [--benchmarks webhook,core] [--runs 2]

The earlier commit is checked out in a temporary git worktree and both trees run the same
benchmark scripts with this tree's virtual environment, in alternation (base, this, base, ...),
so that the machine's drift falls on both alike. Each script pairs its own rounds with bare
aiohttp (benchmarks/common.py), so what is compared is the per-round ratio to that baseline, not
absolute throughput. Prints, and writes to benchmarks/results/compare.json, every round's ratio
and the median per side. The benchmark scripts' own results files are left as they were.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def ratios(results: dict) -> list[float]:
    """Every round's throughput as a ratio to the bare aiohttp round beside it."""
    bare = results["bare_aiohttp"]["rounds"]
    ours = next(
        value
        for key, value in results.items()
        if key != "bare_aiohttp" and isinstance(value, dict) and "rounds" in value
    )["rounds"]
    return [round(a["rps"] / b["rps"], 3) for a, b in zip(ours, bare, strict=True)]


def run(tree: Path, benchmark: str, seconds: float) -> list[float]:
    result = tree / "benchmarks" / "results" / f"{benchmark}.json"
    kept = result.read_bytes() if result.exists() else None
    try:
        subprocess.run(
            [sys.executable, f"benchmarks/{benchmark}.py", "--seconds", str(seconds)],
            cwd=tree,
            check=True,
            capture_output=True,
        )
        return ratios(json.loads(result.read_text()))
    finally:  # leave the tree's recorded figures alone
        if kept is None:
            result.unlink(missing_ok=True)
        else:
            result.write_bytes(kept)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--benchmarks", default="webhook,core")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    figures: dict = {"base": args.base}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            for benchmark in args.benchmarks.split(","):
                sides: dict[str, list[float]] = {"base": [], "this": []}
                for _ in range(args.runs):
                    for side, tree in (("base", base), ("this", ROOT)):
                        sides[side] += run(tree, benchmark, args.seconds)
                figures[benchmark] = {
                    side: {"median": statistics.median(values), "rounds": sorted(values)}
                    for side, values in sides.items()
                }
                print(benchmark, json.dumps(figures[benchmark]), flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )
    (HERE / "results" / "compare.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
