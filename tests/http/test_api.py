"""The Invoke API, the admin endpoints and the CLI, against the real daemon on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import ROOT, Daemon, running_daemon, write_config
from tests.postgres import BACKENDS, store_toml

FUNCS = Path(__file__).resolve().parents[1] / "functions"
BODY = f"""
[functions.echo]
handler = "handler.handler"
code = "{FUNCS / "echo"}"
concurrency = 2

[functions.boom]
handler = "handler.handler"
code = "{FUNCS / "boom"}"

[functions.slow]
handler = "handler.handler"
code = "{FUNCS / "slow"}"
concurrency = 1
queue_size = 1
timeout_s = 10
"""


@pytest.fixture
async def daemon(tmp_path):
    async with running_daemon(tmp_path, BODY) as d:
        yield d


@pytest.fixture(params=BACKENDS)
async def on_either(request, tmp_path):
    """The daemon on each store backend: SQLite, and PostgreSQL ([store] url)."""
    async with running_daemon(tmp_path, BODY + store_toml(request.param, request)) as d:
        yield d


async def test_api_sync_invoke_returns_result_and_headers(daemon: Daemon):
    status, headers, body = await daemon.invoke("echo", {"x": 1})
    assert status == 200
    result = json.loads(body)
    assert result["event"] == {"x": 1}
    assert result["pid"] != daemon.proc.pid
    assert headers["x-amzn-RequestId"] == result["request_id"]
    assert headers["X-Amz-Executed-Version"] == "$LATEST"
    assert "X-Amz-Function-Error" not in headers
    # daemon/http/wire.py answered, on the connection the harness used for /health first
    assert "Server" not in headers and headers["Date"].endswith(" GMT")
    record = await daemon.get(f"/v1/invocations/{result['request_id']}")
    assert record["status"] == "succeeded"
    assert record["trigger"] == "api"
    assert record["invocation_type"] == "sync"
    assert record["event"] == {"x": 1}
    assert record["result"]["calls"] == result["calls"]
    assert "echo call" in record["logs"]
    assert record["duration_ms"] > 0
    assert record["billed_duration_ms"] >= 1


async def test_api_function_error_is_200_with_unhandled_header(daemon: Daemon):
    status, headers, body = await daemon.invoke("boom", {"why": "testing"})
    assert status == 200
    assert headers["X-Amz-Function-Error"] == "Unhandled"
    error = json.loads(body)
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "boom: testing"
    assert any("handler.py" in frame for frame in error["stackTrace"])
    record = await daemon.get(f"/v1/invocations/{headers['x-amzn-RequestId']}")
    assert (record["status"], record["error_type"]) == ("failed", "ValueError")


async def test_api_async_invoke_is_202_then_runs(on_either: Daemon):
    daemon = on_either
    status, headers, _ = await daemon.invoke("echo", {"n": 7}, kind="Event")
    assert status == 202
    invocation_id = headers["x-amzn-RequestId"]
    record = await daemon.finished(invocation_id, status="succeeded")
    assert record["invocation_type"] == "async"
    assert record["result"]["event"] == {"n": 7}
    assert record["attempt"] == 1
    # a quick attempt's worker pid is written with its outcome: the host pid of the process the
    # pool started (in a sandbox, bwrap's; the handler's own os.getpid() is 2 there)
    started = {entry["pid"] for entry in await daemon.wait_log("worker_started", function="echo")}
    assert record["worker_pid"] in started
    assert [a["worker_pid"] for a in record["attempts"]] == [record["worker_pid"]]


async def test_api_async_attempt_shows_its_worker_while_it_runs(daemon: Daemon):
    status, headers, _ = await daemon.invoke("slow", {"sleep_s": 3}, kind="Event")
    assert status == 202
    invocation_id = headers["x-amzn-RequestId"]

    async def record_if(predicate):
        record = await daemon.get(f"/v1/invocations/{invocation_id}")
        return record if predicate(record) else None

    # Polled: the pid of a running attempt is written VISIBLE_AFTER_S in, and nothing logs it.
    running = await daemon.wait_for(
        lambda: record_if(lambda r: r["status"] == "running" and r["worker_pid"]), timeout_s=10
    )
    assert running["worker_pid"] != daemon.proc.pid
    done = await daemon.finished(invocation_id, status="succeeded", timeout_s=15)
    assert done["worker_pid"] == running["worker_pid"]
    assert [a["worker_pid"] for a in done["attempts"]] == [running["worker_pid"]]


async def test_api_errors_have_lambda_shape(daemon: Daemon):
    status, headers, body = await daemon.invoke("nope", {})
    assert status == 404
    assert headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    assert "nope" in json.loads(body)["message"]
    status, headers, _ = await daemon.invoke("echo", raw=b"{not json")
    assert (status, headers["x-amzn-ErrorType"]) == (400, "InvalidRequestContentException")
    big = b'"' + b"x" * (1024 * 1024 + 10) + b'"'
    status, headers, _ = await daemon.invoke("echo", raw=big, kind="Event")
    assert (status, headers["x-amzn-ErrorType"]) == (413, "RequestTooLargeException")
    status, _, _ = await daemon.invoke("echo", raw=big)  # fine below the 6 MB sync limit
    assert status == 200
    huge = b'"' + b"x" * (6 * 1024 * 1024 + 10) + b'"'
    status, headers, _ = await daemon.invoke("echo", raw=huge)
    assert (status, headers["x-amzn-ErrorType"]) == (413, "RequestTooLargeException")
    status, _, _ = await daemon.invoke("echo", {}, kind="DryRun")
    assert status == 204
    status, headers, _ = await daemon.invoke("echo", {}, kind="Sideways")
    assert (status, headers["x-amzn-ErrorType"]) == (400, "InvalidParameterValueException")


async def test_api_names_arns_qualifiers_and_empty_body(daemon: Daemon):
    arn = "arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Aecho"
    status, _, body = await daemon.invoke(arn, raw=b"")
    assert status == 200
    assert json.loads(body)["event"] == {}
    status, _, _ = await daemon.invoke("echo%3A%24LATEST", {})
    assert status == 200
    status, headers, _ = await daemon.invoke("echo%3A7", {})
    assert (status, headers["x-amzn-ErrorType"]) == (404, "ResourceNotFoundException")


async def test_api_log_tail_has_report_line(daemon: Daemon):
    status, headers, _ = await daemon.invoke("echo", {}, headers={"X-Amz-Log-Type": "Tail"})
    assert status == 200
    tail = base64.b64decode(headers["X-Amz-Log-Result"]).decode()
    request_id = headers["x-amzn-RequestId"]
    assert f"START RequestId: {request_id}" in tail
    assert "echo call" in tail
    assert f"REPORT RequestId: {request_id}\tDuration: " in tail


async def test_api_queue_full_is_429(daemon: Daemon):
    # slow: concurrency 1, queue_size 1 -> a third concurrent caller is turned away.
    first = asyncio.create_task(daemon.invoke("slow", {"sleep_s": 2}))
    await daemon.wait_log("invocation_started", function="slow")
    second = asyncio.create_task(daemon.invoke("slow", {"sleep_s": 0}))
    # Polled: nothing logs a caller waiting for a slot.
    await daemon.wait_for(lambda: _waiting(daemon, "slow"))
    status, headers, body = await daemon.invoke("slow", {"sleep_s": 0})
    assert (status, headers["x-amzn-ErrorType"], headers["Retry-After"]) == (
        429,
        "TooManyRequestsException",
        "1",
    )
    assert json.loads(body)["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert headers["x-amzn-RequestId"]
    assert (await first)[0] == 200
    assert (await second)[0] == 200


async def _waiting(daemon: Daemon, name: str) -> bool:
    fns = {f["name"]: f for f in (await daemon.get("/v1/functions"))["functions"]}
    return fns[name]["waiting"] >= 1


async def test_api_lists_functions_and_filters_invocations(daemon: Daemon):
    functions = (await daemon.get("/v1/functions"))["functions"]
    assert {f["name"] for f in functions} == {"echo", "boom", "slow"}
    await daemon.invoke("echo", {})
    await daemon.invoke("boom", {})
    failed = await daemon.invocations(status="failed")
    assert [r["function"] for r in failed] == ["boom"]
    assert "event" not in failed[0]  # the list is a summary; the full record is per id
    assert len(await daemon.invocations(function="echo")) == 1


def lambda_client(daemon: Daemon) -> Any:
    """boto3's Lambda client for the daemon's API, without retries (each call is seen once)."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "lambda",
        endpoint_url=daemon.base,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=BotoConfig(retries={"max_attempts": 1}),
    )


def refused(call: Any) -> dict[str, Any]:
    """The Lambda error boto3 raised for `call()`: code, status, message and request id."""
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        return {
            "code": exc.response["Error"]["Code"],
            "status": exc.response["ResponseMetadata"]["HTTPStatusCode"],
            "message": exc.response["Error"]["Message"],
            "request_id": exc.response["ResponseMetadata"]["RequestId"],
        }
    raise AssertionError("no error")


async def test_api_boto3_invoke(daemon: Daemon):

    def call():
        client = lambda_client(daemon)
        ok = client.invoke(FunctionName="echo", Payload=b'{"from": "boto3"}', LogType="Tail")
        failed = client.invoke(FunctionName="boom", Payload=b"{}")
        queued = client.invoke(FunctionName="echo", InvocationType="Event", Payload=b"{}")
        try:
            client.invoke(FunctionName="missing", Payload=b"{}")
            missing = None
        except client.exceptions.ResourceNotFoundException as exc:
            missing = exc
        config = client.get_function_configuration(FunctionName="echo")
        return (
            ok,
            json.loads(ok["Payload"].read()),
            failed,
            json.loads(failed["Payload"].read()),
            queued,
            missing,
            config,
        )

    ok, ok_body, failed, failed_body, queued, missing, config = await asyncio.to_thread(call)
    assert ok["StatusCode"] == 200 and ok_body["event"] == {"from": "boto3"}
    assert "REPORT RequestId" in base64.b64decode(ok["LogResult"]).decode()
    assert ok["ResponseMetadata"]["RequestId"] == ok_body["request_id"]
    assert failed["FunctionError"] == "Unhandled" and failed_body["errorType"] == "ValueError"
    assert queued["StatusCode"] == 202
    assert missing is not None
    assert config["State"] == "Active" and config["FunctionName"] == "echo"


async def test_api_boto3_management_calls_page_qualify_and_refuse_modeled(daemon: Daemon):
    """ListFunctions pages, GetFunction honours Qualifier, and calls lambdaemon does not
    implement, or names it cannot take, are errors boto3 models, each with a request id."""

    def calls() -> dict[str, Any]:
        client = lambda_client(daemon)
        pages = client.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 2})
        return {
            "pages": [[f["FunctionName"] for f in page["Functions"]] for page in pages],
            "latest": client.get_function(FunctionName="echo", Qualifier="$LATEST"),
            "no_version": refused(lambda: client.get_function(FunctionName="echo", Qualifier="7")),
            "mappings": refused(client.list_event_source_mappings),
            "url": refused(lambda: client.get_function_url_config(FunctionName="echo")),
            "bad_arn": refused(
                lambda: client.invoke(
                    FunctionName="arn:aws:lambda:us-east-1:000000000000:function:echo:1:extra"
                )
            ),
            "dry_run": client.invoke(FunctionName="echo", InvocationType="DryRun"),
        }

    got = await asyncio.to_thread(calls)
    assert got["pages"] == [["boom", "echo"], ["slow"]]
    assert got["latest"]["Configuration"]["FunctionName"] == "echo"
    assert got["no_version"]["code"] == "ResourceNotFoundException"
    assert got["mappings"]["code"] == got["url"]["code"] == "UnsupportedOperationException"
    assert got["bad_arn"]["code"] == "InvalidParameterValueException"
    assert all(got[k]["request_id"] for k in ("no_version", "mappings", "url", "bad_arn"))
    assert got["dry_run"]["StatusCode"] == 204
    assert got["dry_run"]["ResponseMetadata"]["RequestId"]


async def test_cli_takes_config_before_the_command(daemon: Daemon):
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "daemon.cli", "--config", str(daemon.config), "--json", "functions"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert {f["name"] for f in json.loads(result.stdout)} == {"echo", "boom", "slow"}


def _cli(daemon: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args, "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        timeout=60,
    )


async def test_cli_invoke_functions_invocations_show(daemon: Daemon):
    result = await asyncio.to_thread(_cli, daemon, "invoke", "echo", '{"via": "cli"}')
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["event"] == {"via": "cli"}
    result = await asyncio.to_thread(_cli, daemon, "invoke", "echo", "-", stdin='{"via": "stdin"}')
    assert json.loads(result.stdout)["event"] == {"via": "stdin"}
    result = await asyncio.to_thread(_cli, daemon, "invoke", "boom")
    assert result.returncode == 1
    assert json.loads(result.stdout)["errorType"] == "ValueError"
    result = await asyncio.to_thread(_cli, daemon, "invoke", "echo", "{}", "--async")
    assert result.returncode == 0 and len(result.stdout.strip()) == 36
    result = await asyncio.to_thread(_cli, daemon, "functions")
    assert result.returncode == 0 and "echo" in result.stdout and "NAME" in result.stdout
    result = await asyncio.to_thread(_cli, daemon, "invocations", "--function", "boom", "--json")
    rows = json.loads(result.stdout)
    assert [r["status"] for r in rows] == ["failed"]
    result = await asyncio.to_thread(_cli, daemon, "show", rows[0]["id"])
    assert result.returncode == 0 and "ValueError" in result.stdout
    result = await asyncio.to_thread(_cli, daemon, "show", "no-such-id")
    assert result.returncode == 1


def test_cli_reports_unreachable_daemon(tmp_path):
    config = write_config(tmp_path, "")
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "functions", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 69
    assert "cannot reach the daemon" in result.stderr


async def test_api_token_enforced_when_configured(tmp_path):
    token = tmp_path / "api.token"
    token.write_text("s3cret\n")
    config = write_config(
        tmp_path, f'[functions.echo]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n'
    )
    config.write_text(config.read_text().replace("[api]\n", f'[api]\ntoken_file = "{token}"\n'))
    d = Daemon(config)
    await d.start()
    try:
        status, headers, _ = await d.invoke("echo", {})
        assert status == 401
        status, _, _ = await d.invoke("echo", {}, headers={"Authorization": "Bearer s3cret"})
        assert status == 200
        status, _, _ = await d.invoke("echo", {}, headers={"Authorization": "Bearer wrong"})
        assert status == 401
        result = await asyncio.to_thread(_cli, d, "invoke", "echo")
        assert result.returncode == 0, result.stderr
    finally:
        await d.close()


@pytest.mark.parametrize("with_token", [False, True])
async def test_a_handler_chains_to_a_sibling_with_boto3_unchanged(tmp_path: Path, with_token: bool):
    """The worker's AWS SDK finds the daemon's Lambda API and credentials it accepts; with a
    token set, the workers' own token opens Invoke but not the rest of the API."""
    body = "".join(
        f'[functions.{name}]\nhandler = "handler.handler"\ncode = "{FUNCS / name}"\ntimeout_s = 20\n'
        for name in ("chain", "echo")
    )
    config = write_config(tmp_path, body)
    auth: dict[str, str] = {}
    if with_token:
        (tmp_path / "api.token").write_text("s3cret\n")
        token_line = f'[api]\ntoken_file = "{tmp_path / "api.token"}"\n'
        config.write_text(config.read_text().replace("[api]\n", token_line))
        auth = {"Authorization": "Bearer s3cret"}
    daemon = Daemon(config)
    await daemon.start()
    try:
        status, _, answer = await daemon.invoke("chain", {"target": "echo"}, headers=auth)
        assert status == 200, answer
        result = json.loads(answer)
        assert result["status"] == 200
        assert result["payload"]["event"] == {"from": "chain"}
        assert result["admin"] == (401 if with_token else 200)
        assert result["read"] == "ok"
        # the workers' token may invoke and read, never deploy, publish or move an alias
        assert result["change"] == ("UnrecognizedClientException" if with_token else "ok")
        status, _, answer = await daemon.invoke("chain", {"target": "nope"}, headers=auth)
        assert json.loads(answer) == {"error": "ResourceNotFoundException"}
    finally:
        await daemon.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_restart_resumes_queued_invocations_after_sigkill(tmp_path, backend, request):
    """Queue work behind a slow handler, SIGKILL the daemon, restart: every 202 runs."""
    body = f'[functions.slow]\nhandler = "handler.handler"\ncode = "{FUNCS / "slow"}"\nconcurrency = 1\ntimeout_s = 10\n'
    body += store_toml(backend, request)
    daemon = Daemon(write_config(tmp_path, body))
    await daemon.start()
    accepted = []
    try:
        for n in range(8):
            status, headers, _ = await daemon.invoke("slow", {"sleep_s": 0.3, "n": n}, kind="Event")
            assert status == 202
            accepted.append(headers["x-amzn-RequestId"])
        await daemon.wait_log("invocation_started", function="slow")
        await daemon.kill()
        await daemon.start()
        records = await daemon.wait_logged(lambda: _all_final(daemon, accepted), timeout_s=30)
    finally:
        await daemon.close()
    assert {r["id"] for r in records} == set(accepted)
    assert all(r["status"] == "succeeded" for r in records), [
        (r["id"], r["status"]) for r in records
    ]
    # the one that was running at the kill was recovered as a crashed attempt and run again,
    # and so was each one whose `running` mark was written ahead of its start (the dispatcher's
    # _mark_ahead, while the lane has no timing yet): how many depends on the commits the kill
    # found, and each of them ran exactly once more
    assert max(r["attempt"] for r in records) == 2
    recovered = [e for e in daemon.log_events() if e.get("event") == "dispatcher_recovered"]
    again = sum(r["attempt"] == 2 for r in records)
    assert recovered[-1]["requeued_after_crash"] == again >= 1
    # on PostgreSQL, nothing of the store is in data_dir
    assert (tmp_path / "var" / "lambdaemon.db").exists() == (backend == "sqlite")


async def _all_final(daemon: Daemon, ids: list[str]):
    # Read through the admin API, after the store's barrier: re-checked as the daemon logs.
    rows = {r["id"]: r for r in await daemon.invocations(function="slow")}
    if all(
        rows.get(i, {}).get("status") in ("succeeded", "failed", "crashed", "timed_out")
        for i in ids
    ):
        return [rows[i] for i in ids]
    return None


async def test_sigterm_drains_and_exits_zero(tmp_path):
    body = f'[functions.slow]\nhandler = "handler.handler"\ncode = "{FUNCS / "slow"}"\ntimeout_s = 10\n'
    daemon = Daemon(write_config(tmp_path, body))
    await daemon.start()
    try:
        call = asyncio.create_task(daemon.invoke("slow", {"sleep_s": 1}))
        await daemon.wait_log("invocation_started", function="slow")
        await daemon.signal(__import__("signal").SIGTERM)
        status, _, body_bytes = await call
        assert status == 200 and json.loads(body_bytes)["slept"] == 1
        assert await daemon.wait(20) == 0
    finally:
        await daemon.close()
    assert (tmp_path / "var" / "lambdaemon.db").exists()


async def test_api_repeated_sdk_invocation_id_runs_once(daemon: Daemon):
    repeat = {"amz-sdk-invocation-id": "0d4f5c1e-sdk-retry"}
    event = {"sleep_s": 0.5, "n": 1}
    # a repeat while the first call runs waits for it and answers the same
    first, second = await asyncio.gather(
        daemon.invoke("slow", event, headers=repeat), daemon.invoke("slow", event, headers=repeat)
    )
    assert first[0] == second[0] == 200 and first[2] == second[2]
    request_id = first[1]["x-amzn-RequestId"]
    assert second[1]["x-amzn-RequestId"] == request_id
    # a repeat after it finished gets the cached answer
    third = await daemon.invoke("slow", event, headers=repeat)
    assert (third[1]["x-amzn-RequestId"], third[2]) == (request_id, first[2])
    # the same id with another body is another request; no id at all is never deduplicated
    other = await daemon.invoke("slow", {"sleep_s": 0, "n": 2}, headers=repeat)
    plain = await daemon.invoke("slow", {"sleep_s": 0, "n": 2})
    assert len({request_id, other[1]["x-amzn-RequestId"], plain[1]["x-amzn-RequestId"]}) == 3
    # async: the id is the dedupe key of the committed event
    queued = [await daemon.invoke("echo", {}, kind="Event", headers=repeat) for _ in range(2)]
    assert queued[0][1]["x-amzn-RequestId"] == queued[1][1]["x-amzn-RequestId"]
    assert len(await daemon.invocations(function="slow")) == 3
    assert len(await daemon.invocations(function="echo")) == 1
    deduplicated = [e for e in daemon.log_events() if e.get("event") == "invocation_deduplicated"]
    assert [e["invocation_id"] for e in deduplicated] == [request_id, request_id]


async def test_api_boto3_retry_after_read_timeout_is_not_run_twice(daemon: Daemon):
    import boto3
    from botocore.config import Config as BotoConfig

    def call():
        client = boto3.client(
            "lambda",
            endpoint_url=daemon.base,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=BotoConfig(read_timeout=1, retries={"max_attempts": 4, "mode": "standard"}),
        )
        return client.invoke(FunctionName="slow", Payload=b'{"sleep_s": 1.5}')

    # botocore gives up on the first request after 1 s and sends it again, same SDK id
    response = await asyncio.to_thread(call)
    assert response["StatusCode"] == 200 and json.loads(response["Payload"].read())["slept"] == 1.5
    assert response["ResponseMetadata"]["RetryAttempts"] >= 1
    records = await daemon.invocations(function="slow")
    assert [r["id"] for r in records] == [response["ResponseMetadata"]["RequestId"]]


async def test_handler_in_a_subfolder_by_the_slash_form(tmp_path: Path):
    """`handler = "src/app.handler"`, as the AWS Python runtime takes it (and `src.app.handler`)."""
    code = tmp_path / "fn"
    (code / "src").mkdir(parents=True)
    (code / "src" / "app.py").write_text("def handler(event, context):\n    return {'at': 'src'}\n")
    body = "".join(
        f'[functions.{name}]\nhandler = "{spec}"\ncode = "{code}"\n'
        for name, spec in (("slashed", "src/app.handler"), ("dotted", "src.app.handler"))
    )
    async with running_daemon(tmp_path, body) as daemon:
        for name in ("slashed", "dotted"):
            status, _, answer = await daemon.invoke(name, {})
            assert (status, json.loads(answer)) == (200, {"at": "src"})
    (tmp_path / "bad").mkdir()
    config = write_config(tmp_path / "bad", body.replace("src/app.handler", "src//app.handler"))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "daemon.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 78 and "functions.slashed.handler" in result.stderr
