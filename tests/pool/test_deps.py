"""A worker imports its function's dependency folder (FunctionConfig.deps), after its code."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.models import Status
from daemon.packages import build_environment
from daemon.pool import WorkerPool
from tests.pool.conftest import function, request
from tests.wheels import pinme_wheelhouse

HANDLER = """\
import os
import sys

import pinme


def handler(event, context):
    return {"version": pinme.VERSION, "path": sys.path[:2], "env": "_LAMBDAEMON_DEPS" in os.environ}
"""


async def test_pool_worker_imports_its_own_dependency_folder(
    pool: WorkerPool, tmp_path: Path
) -> None:
    wheelhouse = pinme_wheelhouse(tmp_path / "wheels")
    results = {}
    for version in ("1.0", "2.0"):
        code = tmp_path / f"fn{version}"
        code.mkdir()
        (code / "handler.py").write_text(HANDLER)
        (code / "requirements.txt").write_text(f"pinme=={version}\n")
        deps = await build_environment(code, tmp_path / "data", wheelhouse)
        assert deps is not None
        fn = function(f"pin{version[0]}", "handler.handler", code, deps=str(deps))
        outcome = await pool.invoke(fn, request(fn))
        assert outcome.status is Status.SUCCEEDED, outcome.payload
        results[version] = (json.loads(outcome.payload), code, deps)
    for version, (result, code, deps) in results.items():
        assert result == {"version": version, "path": [str(code), str(deps)], "env": False}


async def test_pool_worker_without_deps_cannot_import_them(
    pool: WorkerPool, tmp_path: Path
) -> None:
    code = tmp_path / "fn"
    code.mkdir()
    (code / "handler.py").write_text(HANDLER)
    fn = function("nodeps", "handler.handler", code)
    outcome = await pool.invoke(fn, request(fn))
    assert outcome.status is Status.FAILED
    assert json.loads(outcome.payload)["errorMessage"] == (
        "Unable to import module 'handler': No module named 'pinme'"
    )


async def test_pool_replaces_the_worker_when_the_deps_change(
    pool: WorkerPool, tmp_path: Path
) -> None:
    wheelhouse = pinme_wheelhouse(tmp_path / "wheels")
    code = tmp_path / "fn"
    code.mkdir()
    (code / "handler.py").write_text(HANDLER)
    versions = []
    for version in ("1.0", "2.0", "1.0"):
        (code / "requirements.txt").write_text(f"pinme=={version}\n")
        deps = await build_environment(code, tmp_path / "data", wheelhouse)
        fn = function("pin", "handler.handler", code, deps=str(deps))
        outcome = await pool.invoke(fn, request(fn))
        versions.append((json.loads(outcome.payload)["version"], outcome.worker_pid))
    assert [version for version, _ in versions] == ["1.0", "2.0", "1.0"]
    assert len({pid for _, pid in versions}) == 3
