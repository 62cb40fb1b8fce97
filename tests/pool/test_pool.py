"""The worker pool against real worker processes: contract, isolation, capture, metering, scale."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.models import Outcome, Status
from daemon.pool import WorkerPool
from tests.daemon_proc import Gate
from tests.pool.conftest import BASIC, FUNCTIONS, alive, function, gone, reapable, request
from tests.waits import LogWatch, until_changed

# --- the handler contract ----------------------------------------------------------------------


async def test_pool_reuses_warm_worker(pool: WorkerPool) -> None:
    fn = function("count")
    outcomes = [await pool.invoke(fn, request(fn)) for _ in range(3)]
    results = [json.loads(outcome.payload) for outcome in outcomes]
    assert [result["calls"] for result in results] == [1, 2, 3]  # module globals persist
    assert {result["pid"] for result in results} == {outcomes[0].worker_pid}
    assert outcomes[0].worker_pid != os.getpid()
    # a worker waking up for a call does not preempt the daemon's loop (daemon/pool/worker.py)
    assert os.sched_getscheduler(outcomes[0].worker_pid) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert outcomes[0].init_duration_ms is not None and outcomes[0].init_duration_ms > 0
    assert [outcome.init_duration_ms for outcome in outcomes[1:]] == [None, None]
    assert pool.stats() == {"count": {"idle": 1, "busy": 0}}


async def test_pool_runs_async_handler_on_a_kept_loop(pool: WorkerPool) -> None:
    fn = function("async", "handler.async_echo")
    first = await pool.invoke(fn, request(fn, b'{"a": 1}'))
    second = await pool.invoke(fn, request(fn))
    assert first.status is Status.SUCCEEDED, first.payload
    assert json.loads(first.payload)["event"] == {"a": 1}
    assert json.loads(first.payload)["loop_id"] == json.loads(second.payload)["loop_id"]


async def test_pool_reports_handler_exception_in_lambda_shape(pool: WorkerPool) -> None:
    fn = function("fail", "handler.fail")
    outcome = await pool.invoke(fn, request(fn, b'{"n": 7}', invocation_id="req-1"))
    assert outcome.status is Status.FAILED
    error = json.loads(outcome.payload)
    assert error["errorType"] == "ValueError" and error["errorMessage"] == "boom 7"
    assert error["requestId"] == "req-1"
    assert isinstance(error["stackTrace"], list) and "in fail" in error["stackTrace"][-1]
    assert not [frame for frame in error["stackTrace"] if "daemon/pool" in frame]
    assert (outcome.error_type, outcome.error_message) == ("ValueError", "boom 7")
    assert outcome.logs.startswith("[ERROR] ValueError: boom 7\rTraceback (most recent call last):")
    again = await pool.invoke(fn, request(fn))
    assert again.worker_pid == outcome.worker_pid  # a handled error keeps the worker


@pytest.mark.parametrize(
    ("code", "handler", "error_type", "message"),
    [
        (
            "import_error",
            "handler.handler",
            "Runtime.ImportModuleError",
            "Unable to import module 'handler': No module named 'module_that_does_not_exist'",
        ),
        (
            None,
            "handler.handler",
            "Runtime.UserCodeSyntaxError",
            "Syntax error in module 'handler'",
        ),
        (
            "basic",
            "handler.missing",
            "Runtime.HandlerNotFound",
            "Handler 'missing' missing on module 'handler'",
        ),
        ("init_raises", "handler.handler", "RuntimeError", "init went wrong"),
    ],
)
async def test_pool_reports_init_errors_and_drops_the_worker(
    pool: WorkerPool,
    logs: LogWatch,
    tmp_path: Path,
    code: str | None,
    handler: str,
    error_type: str,
    message: str,
) -> None:
    if code is None:  # kept out of the repository, where linters would trip over it
        (tmp_path / "handler.py").write_text("def handler(event, context)\n    return {}\n")
    fn = function("broken", handler, code=FUNCTIONS / code if code else tmp_path)
    outcome = await pool.invoke(fn, request(fn))
    assert outcome.status is Status.FAILED
    error = json.loads(outcome.payload)
    assert (error["errorType"], error["requestId"]) == (error_type, "")
    assert error["errorMessage"].startswith(message)
    assert outcome.error_type == error_type and isinstance(error["stackTrace"], list)
    assert outcome.init_duration_ms is not None and f"[ERROR] {error_type}" in outcome.logs
    await logs.wait_for("worker_stopped", pid=outcome.worker_pid, reason="init_failed")
    assert pool.stats() == {}


async def test_pool_fails_cleanly_without_a_code_folder(pool: WorkerPool, tmp_path: Path) -> None:
    fn = function("nowhere", code=tmp_path / "missing")
    outcome = await pool.invoke(fn, request(fn))
    assert outcome.status is Status.FAILED and outcome.error_type == "Runtime.InvalidEntrypoint"
    assert pool.stats() == {}
    assert (await pool.invoke(function("count"), request(fn))).status is Status.SUCCEEDED


async def test_pool_does_not_retry_a_broken_min_warm_init_in_a_loop(
    make_pool: Any, logs: LogWatch
) -> None:
    fn = function("broken", "handler.handler", code=FUNCTIONS / "import_error", min_warm=1)
    pool = await make_pool(functions={"broken": fn})
    await logs.wait_for("worker_stopped", function="broken", reason="init_failed")
    assert len(logs.find("worker_init_failed", function="broken")) == 1
    assert pool.stats() == {"broken": {"idle": 0, "busy": 0}}


async def test_pool_times_out_a_slow_init(pool: WorkerPool) -> None:
    pool.init_timeout_s = 0.5
    fn = function("slow_init", "handler.handler", code=FUNCTIONS / "init_slow")
    outcome = await pool.invoke(fn, request(fn))
    assert outcome.status is Status.TIMED_OUT and outcome.error_type == "Sandbox.Timedout"
    assert "init output" in outcome.logs
    assert not alive(outcome.worker_pid)  # type: ignore[arg-type]


async def test_pool_context_carries_lambda_fields(pool: WorkerPool) -> None:
    fn = function("ctx", "handler.describe_context", timeout_s=3.0, memory_mb=256)
    custom, env = {"k": "v"}, {"e": "1"}
    client_context = {"custom": custom, "env": env, "client": {"installation_id": "inst"}}
    encoded = base64.b64encode(json.dumps(client_context).encode()).decode()
    outcome = await pool.invoke(fn, request(fn, invocation_id="req-ctx", client_context=encoded))
    context = json.loads(outcome.payload)
    assert context["function_name"] == "ctx" and context["function_version"] == "$LATEST"
    assert context["invoked_function_arn"] == fn.arn
    assert context["memory_limit_in_mb"] == "256"  # a str, as in AWS's runtime client
    assert context["aws_request_id"] == "req-ctx"
    assert context["log_group_name"] == "/aws/lambda/ctx"
    assert re.fullmatch(r"\d{4}/\d\d/\d\d/\[\$LATEST\][0-9a-f]{32}", context["log_stream_name"])
    assert context["identity"] == [None, None]
    assert context["client_context"] == {"custom": custom, "env": env, "installation_id": "inst"}
    assert 2000 < context["remaining_ms"] <= 3000


async def test_pool_marshals_results_like_lambda(pool: WorkerPool) -> None:
    returns, echo = function("returns", "handler.returns"), function("echo", "handler.echo")

    async def result(kind: str) -> Outcome:
        return await pool.invoke(returns, request(returns, json.dumps({"kind": kind}).encode()))

    assert (await result("bytes")).payload == b"\x00raw bytes"  # passed through as-is
    assert (await result("decimal")).payload == b'{"price":12.50}'  # a number, not a string
    assert (await result("none")).payload == b"null"
    bad = await result("object")
    assert bad.status is Status.FAILED and bad.error_type == "Runtime.MarshalError"
    assert (await pool.invoke(echo, request(echo, b""))).payload == b"{}"
    unparsable = await pool.invoke(echo, request(echo, b"{nope"))
    assert unparsable.status is Status.FAILED and unparsable.error_type == "Runtime.UnmarshalError"


async def test_pool_marshals_decimals_text_and_floats_strictly(pool: WorkerPool) -> None:
    returns = function("returns", "handler.returns")

    async def result(kind: str) -> Outcome:
        return await pool.invoke(returns, request(returns, json.dumps({"kind": kind}).encode()))

    # Decimals keep their exact digits, as the RIC writes them; the JSON stays compact UTF-8.
    assert (await result("decimals")).payload == (
        '{"items":[{"n":12345678901234567890.10},1E+3],"f":0.5,"text":"é€ 日本"}'.encode()
    )
    nan = await result("nan")  # not JSON: refused rather than written as a bare NaN
    assert nan.status is Status.FAILED and nan.error_type == "Runtime.MarshalError"
    assert "not JSON compliant" in json.loads(nan.payload)["errorMessage"]
    surrogate = await result("surrogate")  # escaped in the JSON string, as ensure_ascii would
    assert surrogate.status is Status.SUCCEEDED
    assert surrogate.payload == b'{"name":"caf\\udce9"}'
    assert json.loads(surrogate.payload) == {"name": "caf\udce9"}


async def test_pool_reports_an_exception_message_that_is_not_valid_unicode(
    pool: WorkerPool,
) -> None:
    fn = function("surrogate", "handler.fail_surrogate")
    outcome = await pool.invoke(fn, request(fn))
    assert outcome.status is Status.FAILED and outcome.error_type == "FileNotFoundError"
    assert outcome.error_message == "no such file: caf\\udce9"  # the lone surrogate, as text
    assert json.loads(outcome.payload)["errorMessage"] == "no such file: caf\udce9"
    again = await pool.invoke(fn, request(fn))
    assert again.worker_pid == outcome.worker_pid  # the worker survived its own error report


async def test_pool_gives_worker_clean_env_and_code_folder(
    pool: WorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("DAEMON_ONLY_SECRET", "s3cret")
    fn = function("env", "handler.environment", env={"GREETING": "hello"}, memory_mb=200)
    result = json.loads((await pool.invoke(fn, request(fn))).payload)
    env = result["env"]
    assert not {"NOTIFY_SOCKET", "DAEMON_ONLY_SECRET", "PYTHONPATH"} & env.keys()
    assert env["GREETING"] == "hello"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "env"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "200"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/env"
    assert env["AWS_LAMBDA_LOG_STREAM_NAME"]
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == fn.region
    assert env["_HANDLER"] == "handler.environment" and env["TZ"] == "UTC"
    assert env["LAMBDA_TASK_ROOT"] == result["cwd"] == result["sys_path0"] == fn.code


# --- isolation ---------------------------------------------------------------------------------


async def test_pool_timeout_kills_process_group_and_starts_fresh(
    pool: WorkerPool, logs: LogWatch
) -> None:
    fn = function("slow", "handler.sleep_with_child", timeout_s=0.5)
    outcome = await pool.invoke(fn, request(fn, b'{"s": 30}', invocation_id="req-slow"))
    assert outcome.status is Status.TIMED_OUT
    assert json.loads(outcome.payload) == {
        "errorType": "Sandbox.Timedout",
        "errorMessage": "RequestId: req-slow Error: Task timed out after 0.50 seconds",
    }
    assert 500 <= outcome.duration_ms < 2000
    assert outcome.max_memory_mb is not None and outcome.max_memory_mb > 1
    child = int(re.search(r"child (\d+)", outcome.logs).group(1))  # type: ignore[union-attr]
    await logs.wait_for("worker_stopped", pid=outcome.worker_pid, reason="timeout")
    assert not alive(outcome.worker_pid)  # type: ignore[arg-type]
    assert await gone(child)  # the handler's own child died with the process group
    fresh = await pool.invoke(fn, request(fn, b'{"s": 0}'))
    assert fresh.status is Status.SUCCEEDED and fresh.worker_pid != outcome.worker_pid
    assert fresh.init_duration_ms is not None


async def test_pool_a_warm_worker_keeps_each_calls_deadline(pool: WorkerPool) -> None:
    # Calls on a warm worker share its guard timer (process.py): each still ends on time, the
    # ones right after quick calls too, and with a deadline shorter than the guard's interval.
    for timeout_s in (0.3, 0.05):
        fn = function("sleepy", "handler.sleep", timeout_s=timeout_s)
        for _ in range(5):
            quick = await pool.invoke(fn, request(fn, b'{"s": 0}'))
            assert quick.status is Status.SUCCEEDED
        slow = await pool.invoke(fn, request(fn, b'{"s": 5}'))
        assert slow.status is Status.TIMED_OUT
        assert timeout_s * 1000 <= slow.duration_ms < timeout_s * 1000 + 400, slow.duration_ms


@pytest.mark.parametrize(
    ("how", "exit_code", "signum", "message"),
    [
        ("segfault", None, signal.SIGSEGV, "signal: segmentation fault"),
        ("exit", 3, None, "exit status 3"),
    ],
)
async def test_pool_isolates_a_crashing_handler(
    pool: WorkerPool, how: str, exit_code: int | None, signum: int | None, message: str
) -> None:
    crash, slow = function("crash", "handler.crash"), function("slow", "handler.sleep")
    event = json.dumps({"how": how}).encode()
    crashed, other = await asyncio.gather(
        pool.invoke(crash, request(crash, event, invocation_id="req-crash")),
        pool.invoke(slow, request(slow, b'{"s": 0.3}')),
    )
    assert crashed.status is Status.CRASHED and crashed.error_type == "Runtime.ExitError"
    assert (crashed.exit_code, crashed.signal) == (exit_code, signum)
    error_message = json.loads(crashed.payload)["errorMessage"]
    assert error_message == f"RequestId: req-crash Error: Runtime exited with error: {message}"
    assert other.status is Status.SUCCEEDED
    if how == "segfault":
        assert "Segmentation fault" in crashed.logs  # faulthandler's dump of the handler's stack
    again = await pool.invoke(crash, request(crash, b'{"how": "no"}'))
    assert again.status is Status.SUCCEEDED and again.worker_pid != crashed.worker_pid


@pytest.mark.parametrize("handler", ["handler.allocate", "handler.allocate_once"])
async def test_pool_fails_clearly_past_memory_limit(
    pool: WorkerPool, logs: LogWatch, handler: str
) -> None:
    fn = function("hungry", handler, memory_mb=64)
    outcome = await pool.invoke(fn, request(fn, b'{"mb": 128}'))
    assert outcome.status is Status.FAILED and outcome.error_type == "Runtime.OutOfMemory"
    assert "memory limit of 64 MB" in (outcome.error_message or "")
    await logs.wait_for("worker_stopped", pid=outcome.worker_pid, reason="out_of_memory")
    fine = await pool.invoke(fn, request(fn, b'{"mb": 8}'))
    assert fine.status is Status.SUCCEEDED and fine.worker_pid != outcome.worker_pid
    assert fine.max_memory_mb is not None and fine.max_memory_mb >= 8


async def test_pool_meters_peak_memory_per_invocation(pool: WorkerPool) -> None:
    fn = function("meter", "handler.allocate", memory_mb=256)
    big = await pool.invoke(fn, request(fn, b'{"mb": 64}'))
    small = await pool.invoke(fn, request(fn, b'{"mb": 1}'))
    assert big.worker_pid == small.worker_pid
    assert big.max_memory_mb - small.max_memory_mb > 50  # type: ignore[operator]


# --- output capture ----------------------------------------------------------------------------


async def test_pool_captures_all_output_per_invocation(pool: WorkerPool, logs: LogWatch) -> None:
    fn = function("output", "handler.output")
    outcome = await pool.invoke(fn, request(fn, invocation_id="req-out"))
    lines = outcome.logs.splitlines()
    assert lines[:4] == ["printed line", "fd1 line", "fd2 line", "stderr line"]
    timestamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(rf"\[INFO\]\t{timestamp}\treq-out\tlogged line", lines[4])
    assert lines[5:] == ["subprocess line", "subprocess stderr", "context line"]
    logged = logs.find("handler_output", invocation_id="req-out")
    assert [entry["line"] for entry in logged] == lines
    count = function("quiet")
    quiet = await pool.invoke(count, request(count))
    assert quiet.logs == ""


async def test_pool_keeps_only_the_first_bytes_of_output(make_pool: Any) -> None:
    pool = await make_pool(log_capture_bytes=1024)
    fn = function("spam", "handler.spam")
    outcome = await pool.invoke(fn, request(fn, b'{"lines": 100000, "s": 0.3}'))
    assert outcome.status is Status.SUCCEEDED
    kept, _, note = outcome.logs.partition("\n[lambdaemon: output truncated")
    assert kept == ("x" * 99 + "\n") * 10 + "x" * 24 and "1024 bytes" in note
    next_call = await pool.invoke(fn, request(fn, b'{"lines": 1}'))
    assert next_call.logs == "x" * 99 + "\n"


async def test_pool_output_of_one_call_never_reaches_the_next(pool: WorkerPool) -> None:
    # A call that printed nothing tells the daemon so, which then neither reads nor empties
    # the capture file: what the calls around it printed must still be theirs alone.
    fn = function("spam", "handler.spam")
    logs = [
        (await pool.invoke(fn, request(fn, b'{"lines": %d}' % n))).logs for n in (2, 0, 0, 1, 0, 3)
    ]
    line = "x" * 99 + "\n"
    assert logs == [line * 2, "", "", line, "", line * 3]


async def test_pool_output_a_thread_writes_after_the_reply_goes_to_the_next_call(
    pool: WorkerPool, tmp_path: Path
) -> None:
    fn = function("late", "handler.late_output")
    go, done = Gate(tmp_path / "go"), tmp_path / "done"
    event = json.dumps({"go": str(go.path), "done": str(done)}).encode()
    first = await pool.invoke(fn, request(fn, event))
    assert first.logs == ""
    go.release()  # the handler's thread prints now, between the two calls
    await until_changed(done, done.exists, 10, "the handler's thread to print")
    second = await pool.invoke(fn, request(fn))
    assert (second.worker_pid, second.logs) == (first.worker_pid, "late line\n")


# --- scale ---------------------------------------------------------------------------------------


async def test_pool_evicts_least_recently_used_idle_worker_at_the_cap(
    make_pool: Any, logs: LogWatch
) -> None:
    pool = await make_pool(max_workers=2)
    first, second, third = function("first"), function("second"), function("third")
    old = await pool.invoke(first, request(first))
    await pool.invoke(second, request(second))
    await pool.invoke(third, request(third))
    await logs.wait_for("worker_stopped", pid=old.worker_pid, reason="evicted")
    assert pool.stats() == {"second": {"idle": 1, "busy": 0}, "third": {"idle": 1, "busy": 0}}


async def test_pool_waits_in_arrival_order_when_every_worker_is_busy(make_pool: Any) -> None:
    pool = await make_pool(max_workers=1)
    slow, other = function("slow", "handler.sleep"), function("other", "handler.sleep")
    order: list[str] = []
    running = asyncio.Event()

    def starting(label: str) -> Any:
        def on_start(pid: int, started_at: float) -> None:
            order.append(label)
            running.set()

        return on_start

    first = asyncio.create_task(pool.invoke(slow, request(slow, b'{"s": 0.3}'), starting("first")))
    async with asyncio.timeout(10):
        await running.wait()
    # Tasks take their first step in creation order: `second` queues up before `third`.
    quick = b'{"s": 0}'
    second = asyncio.create_task(pool.invoke(other, request(other, quick), starting("second")))
    third = asyncio.create_task(pool.invoke(slow, request(slow, quick), starting("third")))
    outcomes = await asyncio.gather(first, second, third)
    assert order == ["first", "second", "third"]
    assert [outcome.status for outcome in outcomes] == [Status.SUCCEEDED] * 3
    assert len({outcome.worker_pid for outcome in outcomes}) == 3  # one process at a time


async def test_pool_scales_to_zero_after_idle_timeout(pool: WorkerPool, logs: LogWatch) -> None:
    fn = function("brief", idle_timeout_s=0.3)
    outcome = await pool.invoke(fn, request(fn))
    stopped = await logs.wait_for("worker_stopped", pid=outcome.worker_pid, reason="idle")
    assert stopped["function"] == "brief"
    assert pool.stats() == {} and not alive(outcome.worker_pid)  # type: ignore[arg-type]


async def test_pool_keeps_min_warm_workers(make_pool: Any, logs: LogWatch) -> None:
    fn = function("warm", "handler.sleep", min_warm=1, concurrency=2, idle_timeout_s=0.2)
    pool = await make_pool(functions={"warm": fn})
    assert pool.stats() == {"warm": {"idle": 1, "busy": 0}}  # ready before any call
    both = await asyncio.gather(*(pool.invoke(fn, request(fn, b'{"s": 0.1}')) for _ in range(2)))
    assert sorted(outcome.init_duration_ms is None for outcome in both) == [False, True]
    await logs.wait_for("worker_stopped", function="warm", reason="idle")
    assert pool.stats() == {"warm": {"idle": 1, "busy": 0}}  # one stays past the idle timeout
    (survivor,) = {outcome.worker_pid for outcome in both} - {
        entry["pid"] for entry in logs.find("worker_stopped", reason="idle")
    }
    mark = logs.mark()
    os.kill(survivor, signal.SIGKILL)
    await logs.wait_for("worker_stopped", pid=survivor, reason="crashed", signal=signal.SIGKILL)
    await logs.wait_for("worker_started", function="warm", since=mark)  # replaced
    assert not reapable(survivor)  # reaped: no zombie left
    assert pool.stats() == {"warm": {"idle": 1, "busy": 0}}


async def test_pool_reaps_a_worker_that_dies_while_idle(pool: WorkerPool, logs: LogWatch) -> None:
    fn = function("fragile")
    first = await pool.invoke(fn, request(fn))
    os.kill(first.worker_pid, signal.SIGKILL)  # type: ignore[arg-type]
    await logs.wait_for("worker_stopped", pid=first.worker_pid, reason="crashed")
    assert not reapable(first.worker_pid)  # type: ignore[arg-type]
    second = await pool.invoke(fn, request(fn))
    assert second.status is Status.SUCCEEDED and second.worker_pid != first.worker_pid


async def test_pool_cancelled_invocation_kills_its_worker(pool: WorkerPool, logs: LogWatch) -> None:
    fn = function("cancel", "handler.sleep")
    running: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    call = asyncio.create_task(
        pool.invoke(fn, request(fn, b'{"s": 30}'), lambda pid, _: running.set_result(pid))
    )
    async with asyncio.timeout(10):
        pid = await running
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await logs.wait_for("worker_stopped", pid=pid, reason="cancelled")
    after = await pool.invoke(fn, request(fn, b'{"s": 0}'))
    assert after.status is Status.SUCCEEDED and after.worker_pid != pid


async def test_pool_update_retires_workers_of_changed_functions(
    pool: WorkerPool, logs: LogWatch
) -> None:
    fn = function("env", "handler.environment", env={"V": "1"})
    before = await pool.invoke(fn, request(fn))
    changed = function("env", "handler.environment", env={"V": "2"})
    await pool.update({"env": changed})
    await logs.wait_for("worker_stopped", pid=before.worker_pid, reason="retired")
    after = await pool.invoke(changed, request(changed))
    assert json.loads(after.payload)["env"]["V"] == "2"


async def test_pool_close_leaves_no_process_behind(make_pool: Any) -> None:
    pool = await make_pool()
    spawner, slow = function("spawner", "handler.spawn_sleeper"), function("slow", "handler.sleep")
    grandchild = json.loads((await pool.invoke(spawner, request(spawner))).payload)["child"]
    running: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    call = asyncio.create_task(
        pool.invoke(slow, request(slow, b'{"s": 30}'), lambda pid, _: running.set_result(pid))
    )
    async with asyncio.timeout(10):
        busy_pid = await running
    assert alive(grandchild)
    await pool.close()
    outcome = await call
    assert outcome.status is Status.CRASHED and outcome.signal == signal.SIGKILL
    assert not alive(busy_pid) and await gone(grandchild)
    assert pool.stats() == {}


async def test_pool_workers_die_with_a_killed_daemon(tmp_path: Path) -> None:
    script = tmp_path / "mini_daemon.py"
    script.write_text(MINI_DAEMON.format(code=str(BASIC)))
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=Path(__file__).parents[2],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert daemon.stdout is not None
    try:
        async with asyncio.timeout(10):
            worker_pid = int(await daemon.stdout.readline())
        assert alive(worker_pid)
    finally:
        daemon.kill()  # no chance to clean up: the kernel has to take the busy worker down
        await daemon.wait()
    assert await gone(worker_pid)


MINI_DAEMON = """
import asyncio, sys
import structlog
from daemon.config import FunctionConfig
from daemon.models import InvokeRequest
from daemon.pool import WorkerPool

async def main():
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    pool = WorkerPool(1)
    await pool.start({{}})
    fn = FunctionConfig(handler="handler.sleep", name="hang", code={code!r}, timeout_s=60)
    started = lambda pid, _: print(pid, flush=True)
    await pool.invoke(fn, InvokeRequest("hang", b'{{"s": 60}}', fn.arn), started)

asyncio.run(main())
"""
