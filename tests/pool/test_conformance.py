"""Runtime API conformance with clients nobody here wrote, and the Go and shell examples.

AWS's Python runtime interface client (`awslambdaric`, from PyPI) runs unchanged from a
`bootstrap`; the Go example is built with Debian's Go toolchain (tests/run installs golang-go);
the shell example is AWS's custom-runtime tutorial's shape with curl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.models import Status
from daemon.pool import WorkerPool
from tests.pool.conftest import function, request

ROOT = Path(__file__).resolve().parents[2]
APP = """\
import os

calls = 0


def handler(event, context):
    global calls
    calls += 1
    print(f"ric call {calls}")
    return {
        "event": event,
        "calls": calls,
        "pid": os.getpid(),
        "request_id": context.aws_request_id,
        "arn": context.invoked_function_arn,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "function_name": context.function_name,
        "memory": context.memory_limit_in_mb,
    }


def fails(event, context):
    raise ValueError("no such sensor")
"""


async def call(pool: WorkerPool, fn: Any, event: Any, **fields: Any) -> Any:
    return await pool.invoke(fn, request(fn, json.dumps(event).encode(), **fields))


@pytest.fixture
def ric_code(tmp_path: Path) -> Path:
    code = tmp_path / "ric"
    code.mkdir()
    (code / "app.py").write_text(APP)
    (code / "broken.py").write_text("import no_such_module_here\n")
    bootstrap = code / "bootstrap"
    # As AWS documents for a custom image: the client is a Python module run with the handler.
    bootstrap.write_text(f'#!/bin/sh\nexec {sys.executable} -m awslambdaric "$_HANDLER"\n')
    bootstrap.chmod(0o755)
    return code


async def test_awslambdaric_serves_through_the_runtime_api(
    pool: WorkerPool, ric_code: Path
) -> None:
    fn = function("ric", "app.handler", ric_code, runtime="provided", timeout_s=10)
    first = await call(pool, fn, {"sensor": 1}, invocation_id="req-ric-1")
    assert first.status is Status.SUCCEEDED, first.payload
    answer = json.loads(first.payload)
    assert answer["event"] == {"sensor": 1} and answer["calls"] == 1
    assert answer["request_id"] == "req-ric-1" and answer["arn"] == fn.arn
    assert 0 < answer["remaining_ms"] <= 10_000
    assert answer["function_name"] == "ric" and answer["memory"] == "128"
    assert "ric call 1" in first.logs and first.init_duration_ms is not None
    second = await call(pool, fn, {"sensor": 2})
    assert json.loads(second.payload)["calls"] == 2  # warm: the same client process
    assert json.loads(second.payload)["pid"] == answer["pid"]


async def test_awslambdaric_errors_and_init_errors(pool: WorkerPool, ric_code: Path) -> None:
    fails = function("ricfail", "app.fails", ric_code, runtime="provided", timeout_s=10)
    outcome = await call(pool, fails, {})
    assert outcome.status is Status.FAILED and outcome.error_type == "ValueError"
    body = json.loads(outcome.payload)
    assert body["errorMessage"] == "no such sensor" and body["errorType"] == "ValueError"
    broken = function("ricbroken", "broken.handler", ric_code, runtime="provided", timeout_s=10)
    outcome = await call(pool, broken, {})
    assert outcome.status is Status.FAILED
    assert outcome.error_type == "Runtime.ImportModuleError"
    assert "no_such_module_here" in json.loads(outcome.payload)["errorMessage"]


def build_go(source: Path, out: Path, cache: Path) -> None:
    env = {**os.environ, "GOCACHE": str(cache), "CGO_ENABLED": "0", "HOME": str(cache)}
    subprocess.run(
        ["go", "build", "-o", str(out), "."], cwd=source, env=env, check=True, timeout=300
    )


async def test_go_example_serves_warm(pool: WorkerPool, tmp_path: Path) -> None:
    code = tmp_path / "go"
    code.mkdir()
    build_go(ROOT / "functions" / "hello_go", code / "bootstrap", tmp_path / "cache")
    fn = function("go", "main.handler", code, runtime="provided")
    first = await call(pool, fn, {"name": "edge"}, invocation_id="req-go")
    assert first.status is Status.SUCCEEDED, first.payload
    assert json.loads(first.payload) == {
        "message": "hello, edge!",
        "warm_calls": 1,
        "request_id": "req-go",
    }
    assert "greeting edge (call 1" in first.logs
    second = await call(pool, fn, {})
    assert json.loads(second.payload)["warm_calls"] == 2
    bad = await call(pool, fn, [1, 2])
    assert bad.status is Status.FAILED and bad.error_type == "Function.InvalidEvent"


async def test_shell_example_serves_with_curl(pool: WorkerPool) -> None:
    code = ROOT / "functions" / "hello_shell"
    fn = function("sh", "function.handler", code, runtime="provided")
    outcome = await call(pool, fn, {"x": 1})
    assert outcome.status is Status.SUCCEEDED, outcome.payload
    assert json.loads(outcome.payload) == {"message": "hello from sh", "event": {"x": 1}}
    assert 'shell handler got: {"x": 1}' in outcome.logs


# AWS's Node.js runtime interface client (npm's aws-lambda-ric, a native addon built from its
# bundled sources); tests/run builds the pinned version into .venv/ric when it is missing.
NODE_RIC = ROOT / ".venv" / "ric" / "node_modules" / "aws-lambda-ric" / "bin" / "index.mjs"
NODE_APP = """\
let calls = 0;

exports.handler = async (event, context) => {
  calls += 1;
  console.log(`node ric call ${calls}`);
  return {
    event,
    calls,
    pid: process.pid,
    request_id: context.awsRequestId,
    arn: context.invokedFunctionArn,
    remaining_ms: context.getRemainingTimeInMillis(),
    function_name: context.functionName,
  };
};

exports.callback = (event, context, callback) => {
  callback(null, { style: "callback", event });
};

exports.fails = async () => {
  const error = new Error("no such sensor");
  error.name = "SensorError";
  throw error;
};
"""


@pytest.fixture
def node_ric_code(tmp_path: Path) -> Path:
    assert NODE_RIC.is_file(), f"{NODE_RIC} is missing: tests/run builds aws-lambda-ric there"
    code = tmp_path / "noderic"
    code.mkdir()
    (code / "index.js").write_text(NODE_APP)
    (code / "broken.js").write_text("require('no-such-package-here');\n")
    bootstrap = code / "bootstrap"
    # As AWS documents for a custom image: the client's entry point run with the handler.
    bootstrap.write_text(f'#!/bin/sh\nexec node {NODE_RIC} "$_HANDLER"\n')
    bootstrap.chmod(0o755)
    return code


async def test_node_aws_lambda_ric_serves_through_the_runtime_api(
    pool: WorkerPool, node_ric_code: Path
) -> None:
    fn = function("noderic", "index.handler", node_ric_code, runtime="provided", timeout_s=10)
    first = await call(pool, fn, {"sensor": 1}, invocation_id="req-noderic-1")
    assert first.status is Status.SUCCEEDED, first.payload
    answer = json.loads(first.payload)
    assert answer["event"] == {"sensor": 1} and answer["calls"] == 1
    assert answer["request_id"] == "req-noderic-1" and answer["arn"] == fn.arn
    assert 0 < answer["remaining_ms"] <= 10_000 and answer["function_name"] == "noderic"
    assert "node ric call 1" in first.logs and first.init_duration_ms is not None
    second = await call(pool, fn, {"sensor": 2})
    assert json.loads(second.payload)["calls"] == 2  # warm: the same client process
    assert json.loads(second.payload)["pid"] == answer["pid"]
    styled = function("nodericcb", "index.callback", node_ric_code, runtime="provided")
    outcome = await call(pool, styled, [1])
    assert json.loads(outcome.payload) == {"style": "callback", "event": [1]}


async def test_node_aws_lambda_ric_errors_and_init_errors(
    pool: WorkerPool, node_ric_code: Path
) -> None:
    fails = function("noderfail", "index.fails", node_ric_code, runtime="provided", timeout_s=10)
    outcome = await call(pool, fails, {})
    assert outcome.status is Status.FAILED and outcome.error_type == "SensorError"
    body = json.loads(outcome.payload)
    assert body["errorMessage"] == "no such sensor" and body["errorType"] == "SensorError"
    broken = function("noderbroken", "broken.handler", node_ric_code, runtime="provided")
    outcome = await call(pool, broken, {})
    assert outcome.status is Status.FAILED
    assert outcome.error_type == "Runtime.ImportModuleError", outcome.payload
    assert "no-such-package-here" in json.loads(outcome.payload)["errorMessage"]
