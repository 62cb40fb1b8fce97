"""The webhook source over real HTTP on loopback, against the real daemon as a subprocess."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from multidict import CIMultiDict
from structlog.testing import capture_logs

from daemon.config import load_config
from daemon.dispatcher import Dispatcher
from daemon.pool import WorkerPool
from daemon.store.sqlite import Store
from tests.daemon_proc import ROOT, Daemon, Gate, free_port, shared_folder, write_config
from triggers.webhook import WebhookSource

pytestmark = pytest.mark.asyncio(loop_scope="module")

FUNCS = Path(__file__).resolve().parent / "functions"
TOKEN, PASSWORD, SECRET = "tok-3f9a7c", "pw-81d2e0", "hmac-5b6c1d"
MAX_BODY = 65536


def body_toml(port: int, gate_dir: Path) -> str:
    return f"""
[webhooks]
listen = "127.0.0.1:{port}"
max_body_bytes = {MAX_BODY}

[functions.mirror]
handler = "handler.handler"
code = "{FUNCS / "webhook_mirror"}"
concurrency = 2

[[functions.mirror.triggers]]
type = "webhook"
path = "/mirror"
methods = ["GET", "POST", "PUT"]

[[functions.mirror.triggers]]
type = "webhook"
path = "/async"
mode = "async"

[[functions.mirror.triggers]]
type = "webhook"
path = "/token"
auth = {{ type = "token", token_file = "token" }}

[[functions.mirror.triggers]]
type = "webhook"
path = "/gitlab"
auth = {{ type = "token", token_file = "token", header = "X-Gitlab-Token" }}

[[functions.mirror.triggers]]
type = "webhook"
path = "/basic"
auth = {{ type = "basic", username = "alice", password_file = "password" }}

[[functions.mirror.triggers]]
type = "webhook"
path = "/github"
mode = "async"
auth = {{ type = "hmac", secret_file = "secret" }}

[[functions.mirror.triggers]]
type = "webhook"
path = "/slack"
auth.type = "hmac"
auth.secret_file = "secret"
auth.header = "X-Slack-Signature"
auth.timestamp_header = "X-Slack-Request-Timestamp"

[functions.respond]
handler = "handler.handler"
code = "{FUNCS / "webhook_respond"}"
triggers = [{{ type = "webhook", path = "/respond" }}]

[functions.echo]
handler = "handler.handler"
code = "{ROOT / "functions" / "webhook_echo"}"
triggers = [{{ type = "webhook", path = "/echo", methods = ["GET", "POST"] }}]

[functions.fail]
handler = "handler.handler"
code = "{FUNCS / "webhook_fail"}"
timeout_s = 0.5
triggers = [{{ type = "webhook", path = "/fail" }}, {{ type = "webhook", path = "/fail/hang" }}]

[functions.gate]
handler = "handler.handler"
code = "{FUNCS / "webhook_gate"}"
concurrency = 1
queue_size = 0
timeout_s = 30
env = {{ GATE_DIR = "{gate_dir}" }}
triggers = [{{ type = "webhook", path = "/gate" }}]
"""


class Hooks:
    """The daemon plus a client for its webhook listener."""

    def __init__(self, daemon: Daemon, port: int, gate: Gate) -> None:
        self.daemon, self.base, self.gate = daemon, f"http://127.0.0.1:{port}", gate

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, bytes]:
        assert self.daemon.session is not None
        async with self.daemon.session.request(method, self.base + path, **kwargs) as resp:
            return resp.status, resp.headers, await resp.read()

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.daemon.log_events()
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    async def wait_event(self, name: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        return await self.daemon.wait_log(name, count, timeout_s=10, **match)

    async def wait_gate_busy(self, since: int = 0) -> None:
        """Until the gate function's only slot is taken (after log position `since`)."""
        await self.daemon.wait_log("invocation_started", function="gate", since=since, timeout_s=10)

    async def record(self, invocation_id: str) -> dict[str, Any]:
        """The invocation's record once it has a final status."""

        async def final():  # the admin API reads after the store's barrier
            record = await self.daemon.get(f"/v1/invocations/{invocation_id}")
            return record if record.get("status") not in (None, "queued", "running") else None

        return await self.daemon.wait_logged(final, timeout_s=10)


async def start(tmp: Path) -> Hooks:
    for name, secret in (("token", TOKEN), ("password", PASSWORD), ("secret", SECRET)):
        (tmp / name).write_text(secret + "\n")
    gate_dir = shared_folder(tmp) / "gate"
    gate_dir.mkdir()
    port = free_port()
    gate = Gate(gate_dir / "gate")  # shut until a test releases it
    hooks = Hooks(Daemon(write_config(tmp, body_toml(port, gate_dir))), port, gate)
    try:
        await hooks.daemon.start()  # /health answers before the sources have started
        await hooks.wait_event("webhook_listening")
    except BaseException:
        await hooks.daemon.close()
        raise
    return hooks


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def hooks(tmp_path_factory):
    hooks = await start(tmp_path_factory.mktemp("webhook"))
    try:
        yield hooks
    finally:
        await hooks.daemon.close()
    # No secret ever reaches the daemon's log, whatever the tests sent.
    text = hooks.daemon.logs()
    assert TOKEN not in text and PASSWORD not in text and SECRET not in text


# --- events ---------------------------------------------------------------------------------


async def test_webhook_event_is_function_url_v2(hooks: Hooks):
    headers = CIMultiDict(
        [
            ("X-Multi", "one"),
            ("X-Multi", "two"),
            ("Cookie", "k1=v1; k2=v2"),
            ("User-Agent", "tester/1"),
            ("Content-Type", "application/json"),
        ]
    )
    status, resp_headers, body = await hooks.request(
        "POST", "/mirror?a=1&a=2&b=x%20y&flag", headers=headers, data=b'{"hello": "world"}'
    )
    assert status == 200
    out = json.loads(body)
    event, request_id = out["event"], out["request_id"]
    assert resp_headers["x-amzn-RequestId"] == request_id
    assert event["version"] == "2.0" and event["routeKey"] == "POST /mirror"
    assert event["rawPath"] == "/mirror"
    assert event["rawQueryString"] == "a=1&a=2&b=x%20y&flag"
    assert event["queryStringParameters"] == {"a": "1,2", "b": "x y", "flag": ""}
    assert event["cookies"] == ["k1=v1", "k2=v2"]
    assert event["headers"]["x-multi"] == "one,two"
    assert event["headers"]["content-type"] == "application/json"
    assert "cookie" not in event["headers"] and all(k == k.lower() for k in event["headers"])
    assert event["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert event["body"] == '{"hello": "world"}' and event["isBase64Encoded"] is False
    ctx = event["requestContext"]
    assert ctx["http"] == {
        "method": "POST",
        "path": "/mirror",
        "protocol": "HTTP/1.1",
        "sourceIp": "127.0.0.1",
        "userAgent": "tester/1",
    }
    assert ctx["routeKey"] == "POST /mirror" and ctx["stage"] == "$default"
    assert ctx["domainName"] == "127.0.0.1" and ctx["domainPrefix"] == "127"
    assert isinstance(ctx["accountId"], str) and isinstance(ctx["apiId"], str)
    assert uuid.UUID(ctx["requestId"])
    assert type(ctx["timeEpoch"]) is int and abs(ctx["timeEpoch"] / 1000 - time.time()) < 60
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000", ctx["time"])
    record = await hooks.record(request_id)  # sync invocations are recorded too
    assert record["trigger"] == "webhook" and record["trigger_id"] == "mirror#0"
    assert record["invocation_type"] == "sync" and record["status"] == "succeeded"


async def test_webhook_event_without_body_or_query_omits_them(hooks: Hooks):
    status, _, body = await hooks.request("GET", "/mirror")
    event = json.loads(body)["event"]
    assert status == 200
    assert event["rawQueryString"] == "" and event["isBase64Encoded"] is False
    assert {"body", "cookies", "queryStringParameters"}.isdisjoint(event)


@pytest.mark.parametrize(
    ("content_type", "payload", "is_text"),
    [
        ("application/octet-stream", bytes(range(256)), False),
        ("image/png", b"\x89PNG\r\n\x1a\n\x00", False),
        ("text/plain", b"\xff\xfe not utf-8", False),  # labelled text, but it is not UTF-8
        ("text/plain; charset=utf-8", "grüße".encode(), True),
        ("application/vnd.github+json", b'{"a": 1}', True),
        ("application/x-www-form-urlencoded", b"a=1&b=2", True),
    ],
)
async def test_webhook_event_body_encoding(
    hooks: Hooks, content_type: str, payload: bytes, is_text: bool
):
    status, _, body = await hooks.request(
        "PUT", "/mirror", data=payload, headers={"Content-Type": content_type}
    )
    event = json.loads(body)["event"]
    assert status == 200
    assert event["isBase64Encoded"] is (not is_text)
    sent = event["body"].encode() if is_text else base64.b64decode(event["body"])
    assert sent == payload


# --- sync responses -------------------------------------------------------------------------


async def test_webhook_echo_example_returns_a_structured_response(hooks: Hooks):
    status, headers, body = await hooks.request("POST", "/echo?x=1&x=2", json={"n": 5})
    assert status == 200
    assert headers["x-echo-method"] == "POST"
    assert headers.getall("Set-Cookie") == ["echoed=1; Path=/; HttpOnly"]
    echo = json.loads(body)
    assert echo["method"] == "POST" and echo["path"] == "/echo"
    assert echo["query"] == {"x": "1,2"} and json.loads(echo["body"]) == {"n": 5}
    assert echo["request_id"] == headers["x-amzn-RequestId"]


async def test_webhook_structured_response_maps_status_headers_cookies_body(hooks: Hooks):
    result = {
        "statusCode": 201,
        "headers": {"Content-Type": "text/plain", "X-A": "1", "X-N": 7},
        "cookies": ["a=1", "b=2; Path=/; Secure"],
        "body": "created",
    }
    status, headers, body = await hooks.request("POST", "/respond", json=result)
    assert (status, body) == (201, b"created")
    assert headers["Content-Type"] == "text/plain"
    assert (headers["X-A"], headers["X-N"]) == ("1", "7")
    assert headers.getall("Set-Cookie") == ["a=1", "b=2; Path=/; Secure"]


async def test_webhook_structured_response_base64_body_is_decoded(hooks: Hooks):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    result = {
        "statusCode": 200,
        "headers": {"content-type": "image/png"},
        "body": base64.b64encode(png).decode(),
        "isBase64Encoded": True,
    }
    status, headers, body = await hooks.request("POST", "/respond", json=result)
    assert (status, body, headers["Content-Type"]) == (200, png, "image/png")


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ("Hello", b'"Hello"'),  # Lambda's docs example: the quotes stay
        ({"message": "hi"}, b'{"message":"hi"}'),  # an object without statusCode
        ([1, 2], b"[1,2]"),
        (None, b"null"),
        (42, b"42"),
    ],
)
async def test_webhook_other_results_are_200_json(hooks: Hooks, result: Any, expected: bytes):
    status, headers, body = await hooks.request(
        "POST", "/respond", data=json.dumps(result), headers={"Content-Type": "application/json"}
    )
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == json.loads(expected)


@pytest.mark.parametrize(
    "result",
    [
        {"statusCode": "200"},
        {"statusCode": 101},
        {"statusCode": 200, "headers": {"x": "a\r\nb"}},
        {"statusCode": 200, "body": "!!", "isBase64Encoded": True},
    ],
)
async def test_webhook_unusable_structured_response_is_502(hooks: Hooks, result: Any):
    status, _, body = await hooks.request("POST", "/respond", json=result)
    assert (status, json.loads(body)) == (502, {"message": "Internal Server Error"})


async def test_webhook_function_error_is_502_without_the_error(hooks: Hooks):
    status, headers, body = await hooks.request("POST", "/fail", json={})
    assert (status, json.loads(body)) == (502, {"message": "Internal Server Error"})
    assert "SECRET-DETAIL" not in body.decode() + str(dict(headers))
    record = await hooks.record(headers["x-amzn-RequestId"])
    assert record["status"] == "failed" and record["error_type"] == "RuntimeError"


async def test_webhook_timeout_is_504(hooks: Hooks):
    status, headers, body = await hooks.request("POST", "/fail/hang", json={})
    assert (status, json.loads(body)) == (504, {"message": "Endpoint request timed out"})
    assert (await hooks.record(headers["x-amzn-RequestId"]))["status"] == "timed_out"


async def test_webhook_saturated_function_is_429(hooks: Hooks):
    mark = hooks.daemon.log_mark()
    first = asyncio.ensure_future(hooks.request("POST", "/gate", json={}))
    await hooks.wait_gate_busy(mark)  # concurrency 1, queue_size 0: the next caller cannot wait
    status, headers, body = await hooks.request("POST", "/gate", json={})
    assert (status, headers["Retry-After"]) == (429, "1")
    assert json.loads(body) == {"message": "Too Many Requests"}
    await hooks.wait_event("webhook_rejected", reason="queue_full")
    hooks.gate.release()
    status, _, body = await first
    assert (status, json.loads(body)) == (200, {"released": True})


# --- async ------------------------------------------------------------------------------------


async def test_webhook_async_answers_202_after_commit_and_runs(hooks: Hooks):
    status, headers, body = await hooks.request("POST", "/async", json={"job": 1})
    assert status == 202
    answer = json.loads(body)
    assert answer["duplicate"] is False and headers["x-amzn-RequestId"] == answer["invocation_id"]
    record = await hooks.record(answer["invocation_id"])
    assert record["status"] == "succeeded"
    assert record["invocation_type"] == "async" and record["trigger_id"] == "mirror#1"
    assert record["event"]["rawPath"] == "/async"
    assert json.loads(record["event"]["body"]) == {"job": 1}
    accepted = [
        e
        for e in hooks.daemon.log_events()
        if e.get("event") == "webhook_accepted"
        and e.get("invocation_id") == answer["invocation_id"]
    ]
    assert accepted and accepted[0]["mode"] == "async"


async def test_webhook_async_redelivery_is_deduplicated(hooks: Hooks):
    async def deliver(delivery: str) -> dict[str, Any]:
        payload = b'{"action": "opened"}'
        headers = {
            "X-GitHub-Delivery": delivery,
            "Content-Type": "application/json",
            "X-Hub-Signature-256": "sha256=" + _mac(payload),
        }
        status, _, body = await hooks.request("POST", "/github", data=payload, headers=headers)
        assert status == 202
        return json.loads(body)

    delivery = str(uuid.uuid4())
    first, again = await deliver(delivery), await deliver(delivery)
    other = await deliver(str(uuid.uuid4()))
    assert again == {"invocation_id": first["invocation_id"], "duplicate": True}
    assert first["duplicate"] is False and other["duplicate"] is False
    assert other["invocation_id"] != first["invocation_id"]
    status, _, body = await hooks.request(
        "POST", "/async", json={}, headers={"Idempotency-Key": delivery}
    )
    assert json.loads(body)["invocation_id"] != first["invocation_id"]  # keys are per route


# --- routing and limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("PUT", "/echo", 405, "GET, HEAD, POST"),
        ("DELETE", "/mirror", 405, "GET, HEAD, POST, PUT"),
        ("POST", "/nope", 404, None),
        ("POST", "/mirror/", 404, None),
    ],
)
async def test_webhook_unknown_path_and_method(
    hooks: Hooks, method: str, path: str, status: int, allow: str | None
):
    got, headers, _ = await hooks.request(method, path)
    assert got == status and headers.get("Allow") == allow


async def test_webhook_body_over_the_limit_is_413(hooks: Hooks):
    before = len(rejections(hooks, "too_large"))
    status, _, _ = await hooks.request("PUT", "/mirror", data=b"x" * (MAX_BODY + 1))
    assert status == 413

    async def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(MAX_BODY // 4096 + 1):
            yield b"y" * 4096

    status, _, _ = await hooks.request("PUT", "/mirror", data=chunks())
    assert status == 413
    await hooks.wait_event("webhook_rejected", before + 2, reason="too_large")  # the 413s
    status, _, body = await hooks.request("PUT", "/mirror", data=b"z" * MAX_BODY)
    assert status == 200 and base64.b64decode(json.loads(body)["event"]["body"]) == b"z" * MAX_BODY


def rejections(hooks: Hooks, reason: str) -> list[dict[str, Any]]:
    return hooks.events("webhook_rejected", reason=reason)


# --- auth -------------------------------------------------------------------------------------


def _mac(body: bytes, stamp: str | None = None) -> str:
    message = f"v0:{stamp}:".encode() + body if stamp is not None else body
    return hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


BODY = b'{"text": "hi"}'
BODY2 = b'{"text": "hi again"}'


def slack(
    sign_stamp: str | None, sent_stamp: str | None, prefix: str = "v0=", body: bytes = BODY
) -> Any:
    """Headers built at request time: "now" means the moment of sending."""

    def build() -> dict[str, str]:
        now = str(int(time.time()))
        signed = now if sign_stamp == "now" else sign_stamp
        headers = {"X-Slack-Signature": prefix + _mac(body, signed)}
        if sent_stamp is not None:
            headers["X-Slack-Request-Timestamp"] = now if sent_stamp == "now" else sent_stamp
        return headers

    return build


AUTH_CASES = [
    ("/token", {"Authorization": f"Bearer {TOKEN}"}, BODY, 200, None),
    ("/token", {"Authorization": "Bearer wrong"}, BODY, 401, "auth_invalid"),
    ("/token", {}, BODY, 401, "auth_missing"),
    ("/token", {"Authorization": f"Token {TOKEN}"}, BODY, 401, "auth_malformed"),
    ("/token", {"Authorization": "Bearer "}, BODY, 401, "auth_malformed"),
    ("/gitlab", {"X-Gitlab-Token": TOKEN}, BODY, 200, None),
    ("/gitlab", {"X-Gitlab-Token": TOKEN + "x"}, BODY, 401, "auth_invalid"),
    ("/gitlab", {"Authorization": f"Bearer {TOKEN}"}, BODY, 401, "auth_missing"),
    ("/basic", {"Authorization": _basic("alice", PASSWORD)}, BODY, 200, None),
    ("/basic", {"Authorization": _basic("alice", "nope")}, BODY, 401, "auth_invalid"),
    ("/basic", {"Authorization": _basic("mallory", PASSWORD)}, BODY, 401, "auth_invalid"),
    ("/basic", {"Authorization": "Basic !!notbase64"}, BODY, 401, "auth_malformed"),
    ("/basic", {"Authorization": f"Bearer {TOKEN}"}, BODY, 401, "auth_malformed"),
    (
        "/basic",
        {"Authorization": "Basic " + base64.b64encode(b"alice").decode()},
        BODY,
        401,
        "auth_invalid",
    ),
    ("/basic", {}, BODY, 401, "auth_missing"),
    ("/github", {"X-Hub-Signature-256": "sha256=" + _mac(BODY)}, BODY, 202, None),
    ("/github", {"X-Hub-Signature-256": "sha256=" + _mac(BODY).upper()}, BODY, 202, None),
    ("/github", {"X-Hub-Signature-256": "sha256=" + _mac(b"other")}, BODY, 401, "auth_invalid"),
    ("/github", {"X-Hub-Signature-256": "sha256=" + _mac(BODY)}, BODY + b" ", 401, "auth_invalid"),
    ("/github", {}, BODY, 401, "auth_missing"),
    ("/github", {"X-Hub-Signature-256": "sha1=" + "0" * 40}, BODY, 401, "auth_malformed"),
    ("/github", {"X-Hub-Signature-256": "sha256=xyz"}, BODY, 401, "auth_malformed"),
    ("/slack", slack("now", "now"), BODY, 200, None),
    # (another body: the same signature again would be a replay, refused with 409)
    ("/slack", slack("now", "now", prefix="sha256=", body=BODY2), BODY2, 200, None),
    ("/slack", slack(None, "now"), BODY, 401, "auth_invalid"),  # the timestamp is in the MAC
    ("/slack", slack("1000", "1000"), BODY, 401, "auth_stale"),  # well signed, but long ago
    ("/slack", slack("now", None), BODY, 401, "auth_missing"),
    ("/slack", slack("soon", "soon"), BODY, 401, "auth_malformed"),
    ("/slack", slack("9" * 5000, "9" * 5000), BODY, 401, "auth_malformed"),
]


@pytest.mark.parametrize(("path", "headers", "body", "status", "reason"), AUTH_CASES)
async def test_webhook_auth(
    hooks: Hooks, path: str, headers: Any, body: bytes, status: int, reason: str | None
):
    headers = headers() if callable(headers) else headers
    before = len(rejections(hooks, reason)) if reason else 0
    got, resp_headers, resp_body = await hooks.request(
        "POST", path, data=body, headers={"Content-Type": "application/json", **headers}
    )
    assert got == status
    if reason is None:
        return
    assert json.loads(resp_body) == {"message": "Unauthorized"}  # no hint of what was wrong
    if path in ("/token", "/basic"):
        assert "WWW-Authenticate" in resp_headers
    events = rejections(hooks, reason)
    assert len(events) == before + 1  # counted, with the running count in the event
    assert events[-1]["route"] == path and events[-1]["remote"] == "127.0.0.1"
    assert events[-1]["status"] == 401 and events[-1]["count"] == len(events)


@pytest.mark.parametrize(
    ("path", "header", "value"),
    [
        ("/token", "authorization", f"Bearer {TOKEN}"),
        ("/gitlab", "x-gitlab-token", TOKEN),
        ("/basic", "authorization", _basic("alice", PASSWORD)),
    ],
)
async def test_webhook_credential_stays_out_of_the_event(
    hooks: Hooks, path: str, header: str, value: str
):
    status, headers, body = await hooks.request(
        "POST", path, data=BODY, headers={header: value, "X-Other": "kept"}
    )
    event = json.loads(body)["event"]
    assert status == 200 and header not in event["headers"]
    assert event["headers"]["x-other"] == "kept"
    record = await hooks.record(headers["x-amzn-RequestId"])
    assert TOKEN not in json.dumps(record) and PASSWORD not in json.dumps(record)


# --- in process: the counters on the source, config errors ------------------------------------


def _config(tmp_path: Path, triggers: str) -> Any:
    (tmp_path / "token").write_text(TOKEN)
    return load_config(
        write_config(
            tmp_path,
            f"""
[webhooks]
listen = "127.0.0.1:0"
[functions.mirror]
handler = "handler.handler"
code = "{FUNCS / "webhook_mirror"}"
triggers = [{triggers}]
""",
        )
    )


def _triggers(config: Any) -> list[tuple[str, str, Any]]:
    return [("mirror", f"mirror#{i}", t) for i, t in enumerate(config.functions["mirror"].triggers)]


async def test_webhook_source_counts_on_itself_and_logs_without_secrets(tmp_path: Path):
    config = _config(
        tmp_path,
        '{ type = "webhook", path = "/t", auth = { type = "token", token_file = "token" } }',
    )
    source = WebhookSource(config, None, _triggers(config))
    pool = WorkerPool(2)
    async with Store.open(tmp_path / "db.sqlite") as store:
        await pool.start(config.functions)
        dispatcher = Dispatcher(store, pool, config.functions)
        task = asyncio.ensure_future(source.run(dispatcher))
        try:
            with capture_logs() as logs:
                async with asyncio.timeout(5):
                    await source.listening.wait()
                url = f"http://127.0.0.1:{source.port}"
                async with aiohttp.ClientSession() as session:
                    for auth in ("", "Bearer bad", "Bearer bad", f"Bearer {TOKEN}"):
                        headers = {"Authorization": auth} if auth else {}
                        async with session.post(url + "/t", headers=headers) as resp:
                            assert resp.status == (200 if auth.endswith(TOKEN) else 401)
                    async with session.get(url + "/elsewhere") as resp:
                        assert resp.status == 404
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await dispatcher.drain(5)  # the sync call's record lands before the store closes
            await pool.close()
    assert source.rejected == {"auth_missing": 1, "auth_invalid": 2, "not_found": 1}
    assert source.auth_failures == 3 and source.accepted == 1
    rejected = [e for e in logs if e["event"] == "webhook_rejected"]
    assert [(e["reason"], e["count"], e["log_level"]) for e in rejected] == [
        ("auth_missing", 1, "warning"),
        ("auth_invalid", 1, "warning"),
        ("auth_invalid", 2, "warning"),
        ("not_found", 1, "info"),
    ]
    assert all(e["remote"] == "127.0.0.1" for e in rejected)
    assert TOKEN not in repr(logs)


# --- shutdown -----------------------------------------------------------------------------------


async def test_webhook_shutdown_finishes_in_flight_and_refuses_new(tmp_path: Path):
    hooks = await start(tmp_path)
    try:
        in_flight = asyncio.ensure_future(hooks.request("POST", "/gate", json={}))
        await hooks.wait_gate_busy()
        await hooks.daemon.signal(signal.SIGTERM)
        await hooks.wait_event("webhook_draining")
        async with aiohttp.ClientSession() as fresh:  # a new connection, not a kept-alive one
            with pytest.raises(aiohttp.ClientConnectorError):
                async with fresh.post(hooks.base + "/gate", json={}):
                    pass
        hooks.gate.release()
        status, _, body = await in_flight
        assert (status, json.loads(body)) == (200, {"released": True})
        assert await hooks.daemon.wait(20) == 0
        assert hooks.events("webhook_stopped")
    finally:
        await hooks.daemon.close()
