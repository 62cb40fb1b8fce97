"""Deploy benchmark: from the start of a deploy to the first call answered by the new code.

    .venv/bin/python benchmarks/deploy.py [--rounds 10] [--size-mb 1]

The package is ~1 MB: a handler, a requirements.txt that pins one dependency, and data files of
random (incompressible) bytes. The dependency is a wheel made here into a wheelhouse, and the
daemon's `[daemon] wheelhouse` points at it, so pip runs offline on both sides.

Ours: UpdateFunctionCode with the zip, PublishVersion, then Invoke of the new version until it
answers (its first call starts a worker of the new code). Each round's package is new, and its
requirements.txt differs by a comment, so the daemon stores a new package *and* runs pip.

Baseline, the same work without lambdaemon: unzip the same package into a fresh folder (python's
zipfile), `pip install --target` its requirements from the same wheelhouse, then a fresh
`python -c` that imports the handler and calls it once.

Rounds alternate (ours, then the baseline); the ratio is ours / baseline per round, reported as
its median with the min and max over rounds. Also measured in each round: a deploy of new code
whose requirements.txt did not change, where the daemon reuses the environment it built and pip
does not run. Writes benchmarks/results/deploy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import report  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402
from tests.wheels import make_wheel  # noqa: E402

DATA_FILES = 8


def make_package(marker: str, requirements: str, size_mb: float) -> bytes:
    """A zip of a handler answering `marker` (and what its dependency says), the requirements
    and `size_mb` of random data files."""
    handler = (
        "import benchdep\n"
        "def handler(event, context):\n"
        f"    return {{'marker': {marker!r}, 'dep': benchdep.VERSION}}\n"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", handler)
        zf.writestr("requirements.txt", requirements)
        chunk = int(size_mb * 1024 * 1024 / DATA_FILES)
        for n in range(DATA_FILES):
            zf.writestr(f"data/blob{n}.bin", os.urandom(chunk))
    return buffer.getvalue()


async def deploy_once(daemon: Daemon, zip_bytes: bytes, marker: str) -> dict[str, float]:
    """UpdateFunctionCode + PublishVersion + the first call of the new version: milliseconds
    of each step and in all, from the start of the deploy call."""
    assert daemon.session is not None
    fn = f"{daemon.base}/2015-03-31/functions/app"
    mark = daemon.log_mark()
    started = time.perf_counter()
    body = {"ZipFile": base64.b64encode(zip_bytes).decode()}
    async with daemon.session.put(f"{fn}/code", json=body) as resp:
        assert resp.status == 200, await resp.text()
    updated = time.perf_counter()
    async with daemon.session.post(f"{fn}/versions", json={}) as resp:
        assert resp.status == 201, await resp.text()
        version = (await resp.json())["Version"]
    published = time.perf_counter()
    status, _, answer = await daemon.invoke(f"app:{version}")
    answered = time.perf_counter()
    assert status == 200 and marker.encode() in answer, answer
    steps = {
        "total_ms": (answered - started) * 1000,
        "update_ms": (updated - started) * 1000,
        "publish_ms": (published - updated) * 1000,
        "first_call_ms": (answered - published) * 1000,
    }
    # inside UpdateFunctionCode, as the daemon logs them: unpacking and pip (when it ran)
    for event in daemon.log_events()[mark:]:
        if event.get("event") == "package_stored":
            steps["unpack_ms"] = event["duration_ms"]
        elif event.get("event") == "environment_built":
            steps["pip_ms"] = event["duration_ms"]
    return steps


def baseline_once(zip_bytes: bytes, marker: str, wheelhouse: Path, work: Path) -> dict[str, float]:
    """The same package by hand: unzip, pip install --target, a fresh python calls it once."""
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(dir=work))
    code, deps = folder / "code", folder / "deps"
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        zf.extractall(code)
    unzipped = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # the wheelhouse alone, as the daemon's pip
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--quiet", "--target", str(deps), "--no-index", "--find-links", str(wheelhouse),
            "-r", str(code / "requirements.txt"),
        ],
        check=True, env=env, cwd=code, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    installed = time.perf_counter()
    call = (
        f"import sys; sys.path[:0] = [{str(code)!r}, {str(deps)!r}]; import handler; "
        "print(handler.handler({}, None))"
    )
    out = subprocess.run([sys.executable, "-c", call], check=True, capture_output=True, text=True)
    answered = time.perf_counter()
    assert marker in out.stdout, out
    return {
        "total_ms": (answered - started) * 1000,
        "unzip_ms": (unzipped - started) * 1000,
        "pip_ms": (installed - unzipped) * 1000,
        "first_call_ms": (answered - installed) * 1000,
    }


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per step: median, min and max over the rounds that have it (ms)."""
    keys = dict.fromkeys(key for run in runs for key in run)
    out = {}
    for key in keys:
        values = [run[key] for run in runs if key in run]
        out[key] = {
            "median": round(statistics.median(values), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
        }
    return out


def ratio(ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> dict[str, float]:
    per_round = [a["total_ms"] / b["total_ms"] for a, b in zip(ours, theirs, strict=True)]
    return {
        "median": round(statistics.median(per_round), 3),
        "min": round(min(per_round), 3),
        "max": round(max(per_round), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size-mb", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        wheelhouse = tmp_path / "wheels"
        make_wheel(wheelhouse, "benchdep", "1.0", {"benchdep/__init__.py": 'VERSION = "1.0"\n'})
        initial = tmp_path / "initial"
        initial.mkdir()
        (initial / "handler.py").write_text("def handler(event, context):\n    return {}\n")
        body = f'[functions.app]\nhandler = "handler.handler"\ncode = "{initial}"\n'
        daemon = Daemon(write_config(tmp_path, body, daemon=f'wheelhouse = "{wheelhouse}"'))
        await daemon.start()
        ours, theirs, reused, sizes = [], [], [], []
        try:
            for n in range(args.rounds + 1):  # round 0 warms both sides up and is not counted
                requirements = f"benchdep==1.0\n# round {n}\n"
                zip_bytes = make_package(f"new-{n}", requirements, args.size_mb)
                # which side goes first alternates too, so neither always runs on a warm cache
                if n % 2:
                    hand = await asyncio.to_thread(
                        baseline_once, zip_bytes, f"new-{n}", wheelhouse, tmp_path
                    )
                mine = await deploy_once(daemon, zip_bytes, f"new-{n}")
                if not n % 2:
                    hand = await asyncio.to_thread(
                        baseline_once, zip_bytes, f"new-{n}", wheelhouse, tmp_path
                    )
                same_env = make_package(f"code-{n}", requirements, args.size_mb)
                again = await deploy_once(daemon, same_env, f"code-{n}")
                if n:
                    ours.append(mine)
                    theirs.append(hand)
                    reused.append(again)
                    sizes.append(len(zip_bytes))
        finally:
            await daemon.close()
    results = {
        "rounds": args.rounds,
        "zip_bytes": statistics.median(sizes),
        "deploy_publish_first_call": summary(ours),
        "baseline_unzip_pip_python": summary(theirs),
        "ratio_vs_baseline": ratio(ours, theirs),
        "deploy_same_requirements": summary(reused),
        "same_requirements_ratio_vs_baseline": ratio(reused, theirs),
    }
    report("deploy", results)


if __name__ == "__main__":
    asyncio.run(main())
