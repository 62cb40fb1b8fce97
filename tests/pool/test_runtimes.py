"""Runtime workers: a `bootstrap` on Lambda's Runtime API (runtime = "provided") and Node.js
(runtime = "nodejs"), with every guarantee of the Python worker: real processes throughout."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from daemon.models import Status
from daemon.pool import WorkerPool
from tests.pool.conftest import FUNCTIONS, alive, function, gone, request
from tests.waits import LogWatch

ROOT = Path(__file__).resolve().parents[2]
API = FUNCTIONS / "runtime_api"
NODE_CJS = FUNCTIONS / "node_cjs"


def provided(name: str = "rt", **settings: Any) -> Any:
    return function(name, "function.handler", API, runtime="provided", **settings)


# The daemon serves a bootstrap's Runtime API on its own loop when the bootstrap can reach the
# daemon's loopback; in a sandbox with `network = false` a bridge inside the sandbox serves it
# (daemon/pool/runtime.py). The tests marked with this fixture run through both.
@pytest.fixture(params=["daemon", "bridge"])
def served(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {} if request.param == "daemon" else {"sandbox": True, "network": False}


async def call(pool: WorkerPool, fn: Any, event: Any, **fields: Any) -> Any:
    return await pool.invoke(fn, request(fn, json.dumps(event).encode(), **fields))


async def test_provided_serves_warm_with_lambdas_headers_and_environment(
    pool: WorkerPool, served: dict[str, Any]
) -> None:
    fn = provided(env={"MY_SETTING": "x"}, memory_mb=256, **served)
    first = await call(pool, fn, {"do": "echo", "n": 1}, invocation_id="req-1")
    assert first.status is Status.SUCCEEDED, first.payload
    answer = json.loads(first.payload)
    assert answer["event"] == {"do": "echo", "n": 1}
    headers, env = answer["headers"], answer["env"]
    assert headers["lambda-runtime-aws-request-id"] == "req-1"
    assert headers["lambda-runtime-invoked-function-arn"] == fn.arn
    assert headers["content-type"] == "application/json"
    assert re.match(
        r"Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=0$",
        headers["lambda-runtime-trace-id"],
    )
    deadline_ms = int(headers["lambda-runtime-deadline-ms"])
    assert abs(deadline_ms - (first.started_at + fn.timeout_s) * 1000) < 50
    assert env["_HANDLER"] == "function.handler" and env["LAMBDA_TASK_ROOT"] == str(API)
    assert (
        env["AWS_LAMBDA_FUNCTION_NAME"] == "rt" and env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    )
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST" and env["MY_SETTING"] == "x"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/rt"
    assert re.match(r"^127\.0\.0\.1:\d+$", env["AWS_LAMBDA_RUNTIME_API"])
    assert "AWS_EXECUTION_ENV" not in env and "PYTHONPATH" not in env  # nothing of the daemon's
    assert answer["cwd"] == str(API)
    assert first.init_duration_ms is not None and first.init_duration_ms > 0
    assert "init in mode ''" in first.logs and "echo req-1" in first.logs
    assert first.max_memory_mb is not None and first.max_memory_mb > 1
    second = await call(pool, fn, {"do": "echo"}, invocation_id="req-2")
    assert json.loads(second.payload)["pid"] == answer["pid"]  # the same warm bootstrap
    assert second.worker_pid == first.worker_pid and second.init_duration_ms is None
    assert second.logs == "echo req-2\n"  # each call's own output


async def test_provided_error_post_is_the_calls_error(
    pool: WorkerPool, served: dict[str, Any]
) -> None:
    fn = provided(**served)
    outcome = await call(pool, fn, {"do": "error"})
    assert outcome.status is Status.FAILED and outcome.error_type == "Custom.Broken"
    assert outcome.error_message == "it broke"
    assert json.loads(outcome.payload)["stackTrace"] == ["a", "b"]
    report = await call(pool, fn, {"do": "report"})
    assert json.loads(report.payload) == [["error", 202, {"status": "OK"}]]


async def test_provided_init_error_fails_the_call_with_its_error(
    pool: WorkerPool, served: dict[str, Any]
) -> None:
    fn = provided(env={"BOOT_MODE": "init_error"}, **served)
    outcome = await call(pool, fn, {"do": "echo"})
    assert outcome.status is Status.FAILED and outcome.error_type == "Custom.InitBroken"
    assert json.loads(outcome.payload)["errorMessage"] == "no config for me"
    assert outcome.init_duration_ms is not None and "init in mode 'init_error'" in outcome.logs


async def test_provided_bootstrap_that_never_polls_is_an_init_timeout(
    pool: WorkerPool, served: dict[str, Any]
) -> None:
    fn = provided(env={"BOOT_MODE": "never_poll"}, timeout_s=0.5, **served)
    outcome = await call(pool, fn, {"do": "echo"})
    assert outcome.status is Status.FAILED and outcome.error_type == "Sandbox.Timedout"
    assert "Init timed out after 0.50 seconds" in (outcome.error_message or "")
    assert "never asked for an invocation" in (outcome.error_message or "")
    assert outcome.worker_pid is not None and await gone(outcome.worker_pid)


async def test_provided_bootstrap_exiting_in_init_or_a_call_is_a_crash(
    pool: WorkerPool, logs: LogWatch, served: dict[str, Any]
) -> None:
    early = await call(pool, provided("early", env={"BOOT_MODE": "exit"}, **served), {"do": "echo"})
    assert early.status is Status.CRASHED and early.exit_code == 7
    fn = provided(**served)
    crashed = await call(pool, fn, {"do": "crash"}, invocation_id="req-crash")
    assert crashed.status is Status.CRASHED and crashed.exit_code == 3
    message = json.loads(crashed.payload)["errorMessage"]
    assert message == "RequestId: req-crash Error: Runtime exited with error: exit status 3"
    assert "crashing now" in crashed.logs
    await logs.wait_for("worker_stopped", pid=crashed.worker_pid, reason="crashed")
    again = await call(pool, fn, {"do": "echo"})
    assert again.status is Status.SUCCEEDED and again.worker_pid != crashed.worker_pid


async def test_provided_timeout_kills_the_bootstrap_and_its_children(
    pool: WorkerPool, logs: LogWatch
) -> None:
    fn = provided(timeout_s=0.5)
    outcome = await call(pool, fn, {"do": "sleep"}, invocation_id="req-slow")
    assert outcome.status is Status.TIMED_OUT
    assert outcome.error_message == "RequestId: req-slow Error: Task timed out after 0.50 seconds"
    child = int(re.search(r"child (\d+)", outcome.logs).group(1))  # type: ignore[union-attr]
    await logs.wait_for("worker_stopped", pid=outcome.worker_pid, reason="timeout")
    assert await gone(child)  # setsid() or not
    fresh = await call(pool, fn, {"do": "echo"})
    assert fresh.status is Status.SUCCEEDED and fresh.init_duration_ms is not None


async def test_provided_memory_limit_ends_the_bootstrap(
    pool: WorkerPool, logs: LogWatch, served: dict[str, Any]
) -> None:
    fn = provided(memory_mb=64, **served)
    outcome = await call(pool, fn, {"do": "allocate", "mb": 128, "hold_s": 5})
    assert outcome.status is Status.FAILED and outcome.error_type == "Runtime.OutOfMemory"
    assert "memory limit of 64 MB" in (outcome.error_message or "")
    await logs.wait_for("worker_stopped", pid=outcome.worker_pid, reason="out_of_memory")
    fine = await call(pool, fn, {"do": "allocate", "mb": 16})
    assert fine.status is Status.SUCCEEDED and fine.max_memory_mb is not None
    assert fine.max_memory_mb >= 16


async def test_provided_runtime_api_misuse_gets_lambdas_errors(
    pool: WorkerPool, served: dict[str, Any]
) -> None:
    fn = provided(**served)
    misuse = await call(pool, fn, {"do": "misuse"})
    assert misuse.status is Status.SUCCEEDED and json.loads(misuse.payload) == {"first": True}
    huge = await call(pool, fn, {"do": "huge"})
    assert huge.status is Status.FAILED and huge.error_type == "Function.ResponseSizeTooLarge"
    report = await call(pool, fn, {"do": "report"})
    assert report.worker_pid == misuse.worker_pid  # the bootstrap served on through all of it
    seen = {name: (status, body) for name, status, body in json.loads(report.payload)}
    assert seen["unknown"][0] == 400 and seen["unknown"][1]["errorType"] == "InvalidRequestID"
    assert seen["next_again"][0] == 403
    assert seen["second"][0] == 403 and seen["second_error"][0] == 403
    assert seen["second"][1]["errorType"] == "InvalidStateTransition"
    assert seen["huge"][0] == 413 and seen["huge"][1]["errorType"] == "RequestEntityTooLarge"


async def test_provided_concurrency_runs_one_bootstrap_per_call(make_pool: Any) -> None:
    pool = await make_pool()
    fn = provided(concurrency=2, timeout_s=5)
    outcomes = await asyncio.gather(
        *(call(pool, fn, {"do": "allocate", "mb": 1, "hold_s": 0.3}) for _ in range(2))
    )
    assert {o.status for o in outcomes} == {Status.SUCCEEDED}
    assert len({o.worker_pid for o in outcomes}) == 2


async def test_provided_min_warm_and_idle_stop(make_pool: Any, logs: LogWatch) -> None:
    fn = provided(min_warm=1, idle_timeout_s=0.2, concurrency=2)
    pool = await make_pool(functions={"rt": fn})
    started = await logs.wait_for("worker_started", function="rt")
    outcome = await call(pool, fn, {"do": "echo"})
    assert outcome.worker_pid == started["pid"] and outcome.init_duration_ms is None
    idle = provided("idle", idle_timeout_s=0.2)
    first = await call(pool, idle, {"do": "echo"})
    await logs.wait_for("worker_stopped", pid=first.worker_pid, reason="idle")
    assert alive(started["pid"])  # min_warm keeps its one


async def test_nodejs_commonjs_callback_and_es_module_async(pool: WorkerPool) -> None:
    cjs = function("cjs", "index.handler", NODE_CJS, runtime="nodejs")
    first = await call(pool, cjs, {"a": 1})
    assert first.status is Status.SUCCEEDED, first.payload
    answer = json.loads(first.payload)
    assert answer["calls"] == 1 and answer["remaining"] and answer["arn"] == cjs.arn
    assert answer["event"] == {"a": 1} and "INFO\tcjs called 1" in first.logs
    second = await call(pool, cjs, {})
    assert json.loads(second.payload)["calls"] == 2 and second.worker_pid == first.worker_pid
    esm = function("esm", "index.handler", ROOT / "functions" / "hello_node", runtime="nodejs")
    outcome = await call(pool, esm, {"name": "edge"})
    assert json.loads(outcome.payload)["message"] == "hello, edge!"
    assert outcome.init_duration_ms is not None and outcome.max_memory_mb is not None


async def test_nodejs_errors_init_errors_and_crashes(pool: WorkerPool) -> None:
    fails = function("fails", "index.fails", NODE_CJS, runtime="nodejs")
    outcome = await call(pool, fails, {})
    assert outcome.status is Status.FAILED and outcome.error_type == "TypeError"
    assert json.loads(outcome.payload)["errorMessage"] == "bad thing"
    missing = function("missing", "index.nope", NODE_CJS, runtime="nodejs")
    outcome = await call(pool, missing, {})
    assert outcome.status is Status.FAILED and outcome.error_type == "Runtime.HandlerNotFound"
    crash = function("crash", "index.crash", NODE_CJS, runtime="nodejs")
    outcome = await call(pool, crash, {})
    assert outcome.status is Status.CRASHED and outcome.exit_code == 5


async def test_a_bootstrap_that_cannot_start_is_an_init_failure_naming_it(
    pool: WorkerPool, tmp_path: Path
) -> None:
    bootstrap = tmp_path / "bootstrap"
    bootstrap.write_text("not a program\n")
    for mode, reason in ((0o644, "Permission denied"), (0o755, "Exec format error")):
        bootstrap.chmod(mode)
        fn = function(f"bad{mode:o}", "function.handler", tmp_path, runtime="provided")
        outcome = await call(pool, fn, {})
        assert outcome.status is Status.FAILED and outcome.error_type == "Runtime.InvalidEntrypoint"
        assert outcome.error_message == f"Cannot start the bootstrap {bootstrap}: {reason}"
