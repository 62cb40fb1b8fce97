"""What every benchmark script shares: percentiles and writing its figures."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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
