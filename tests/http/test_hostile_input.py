"""What the listeners do with bytes a client controls: headers that are not UTF-8, JSON nested
too deep, replayed signatures, and what a handler's sync answer may put on the wire.

Against the real daemon on loopback; requests whose bytes an HTTP client would not send go out
as raw bytes on a socket of their own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.daemon_proc import Daemon, free_port, write_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

FUNCS = Path(__file__).resolve().parents[1] / "functions"
HOOKS = Path(__file__).resolve().parents[1] / "triggers" / "functions"
SECRET = "hmac-7e21c0"
MAX_JSON_DEPTH = (
    512  # daemon.untrusted's (tests/http/test_untrusted.py): so this file loads on main
)


def body_toml(port: int, max_body_bytes: int = 65536) -> str:
    signed = (
        'auth = {{ type = "hmac", secret_file = "secret", header = "X-Signature", '
        'timestamp_header = "X-Timestamp" }}'
    )
    return f"""
[webhooks]
listen = "127.0.0.1:{port}"
max_body_bytes = {max_body_bytes}

[functions.mirror]
handler = "handler.handler"
code = "{HOOKS / "webhook_mirror"}"
triggers = [
    {{ type = "webhook", path = "/mirror", methods = ["GET", "POST"] }},
    {{ type = "webhook", path = "/async", mode = "async" }},
    {{ type = "webhook", path = "/signed", {signed.format()} }},
    {{ type = "webhook", path = "/signed-async", mode = "async", {signed.format()} }},
]

[functions.respond]
handler = "handler.handler"
code = "{HOOKS / "webhook_respond"}"
triggers = [{{ type = "webhook", path = "/respond" }}]

[functions.deep]
handler = "handler.handler"
code = "{FUNCS / "deep"}"
triggers = [{{ type = "webhook", path = "/deep" }}]

[functions.echo]
handler = "handler.handler"
code = "{FUNCS / "echo"}"
"""


class Listeners:
    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon, self.port = daemon, port

    async def hook(
        self, method: str, path: str, headers: Any = (), body: bytes = b""
    ) -> tuple[int, dict[str, list[str]], bytes, bytes]:
        return await send(self.port, request(method, path, headers, body))

    async def api(self, name: str, headers: Any = (), body: bytes = b"{}") -> Any:
        path = f"/2015-03-31/functions/{name}/invocations"
        return await send(self.daemon.api_port, request("POST", path, headers, body))


def request(method: str, path: str, headers: Any = (), body: bytes = b"") -> bytes:
    """A request as exact bytes: values may hold any byte. Host is added unless given."""
    fields = [
        (_b(k), _b(v)) for k, v in (headers.items() if isinstance(headers, dict) else headers)
    ]
    if not any(k.lower() == b"host" for k, _ in fields):
        fields.insert(0, (b"Host", b"127.0.0.1"))
    fields += [(b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")]
    head = b"".join(k + b": " + v + b"\r\n" for k, v in fields)
    return f"{method} {path} HTTP/1.1\r\n".encode() + head + b"\r\n" + body


def _b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode()


async def send(port: int, data: bytes) -> tuple[int, dict[str, list[str]], bytes, bytes]:
    """Send `data` on a new connection; (status, headers, the body its head frames, and any
    bytes after it until the server closed the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(15):
            status = int((await reader.readline()).split()[1])
            headers: dict[str, list[str]] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
            body = await reader.readexactly(int(headers.get("content-length", ["0"])[0]))
            rest = await reader.read()  # Connection: close: whatever else was written
    finally:
        writer.close()
    return status, headers, body, rest


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def listeners(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "secret").write_text(SECRET + "\n")
    port = free_port()
    daemon = Daemon(write_config(tmp, body_toml(port)))
    try:
        await daemon.start()
        await daemon.wait_log("webhook_listening")
        yield Listeners(daemon, port)
    finally:
        await daemon.close()


def errors_since(daemon: Daemon, mark: int) -> list[dict[str, Any]]:
    """Log lines at error level or above after `mark`: none of these requests should make one."""
    return [e for e in daemon.log_events()[mark:] if e.get("level") in ("error", "critical")]


def message(body: bytes) -> str:
    return json.loads(body)["message"]  # type: ignore[no-any-return]


# --- bytes that are not UTF-8 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "header"),
    [
        ("/mirror", "Host"),
        ("/mirror", "Cookie"),
        ("/mirror", "Content-Type"),
        ("/mirror", "User-Agent"),
        ("/mirror", "X-Anything"),
        ("/async", "Idempotency-Key"),
        ("/async", "X-GitHub-Delivery"),
    ],
)
async def test_webhook_header_not_utf8_is_400_naming_it(
    listeners: Listeners, path: str, header: str
):
    mark = listeners.daemon.log_mark()
    value = b"text/\xff\xfe" if header == "Content-Type" else b"a=\xc3\x28\xff"
    status, _, body, _ = await listeners.hook("POST", path, [(header, value)], b"{}")
    assert status == 400
    assert message(body) == f"Bad Request: header {header} is not valid UTF-8"
    rejected = await listeners.daemon.wait_log("webhook_rejected", since=mark, reason="bad_request")
    assert rejected[0]["status"] == 400
    # the same request with the header in UTF-8 is served as usual
    status, _, body, _ = await listeners.hook("POST", path, [(header, "a=ü")], b"{}")
    assert status == (202 if path == "/async" else 200)
    assert errors_since(listeners.daemon, mark) == []


@pytest.mark.parametrize("kind", ["RequestResponse", "Event"])
async def test_api_sdk_invocation_id_not_utf8_is_invalid_request_content(
    listeners: Listeners, kind: str
):
    mark = listeners.daemon.log_mark()
    headers = [("X-Amz-Invocation-Type", kind), ("amz-sdk-invocation-id", b"id-\xff")]
    status, headers_out, body, _ = await listeners.api("echo", headers)
    assert status == 400
    assert headers_out["x-amzn-errortype"] == ["InvalidRequestContentException"]
    assert message(body) == "header amz-sdk-invocation-id is not valid UTF-8"
    assert errors_since(listeners.daemon, mark) == []


def _b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


@pytest.mark.parametrize(
    ("context", "problem"),
    [
        (b"\xff\xfe", "X-Amz-Client-Context is not base64"),
        (b"abcde", "X-Amz-Client-Context is not base64"),  # bad padding
        (_b64(b"[1, 2]"), "not a JSON object"),
        (_b64(b"{nope"), "X-Amz-Client-Context is not base64 of a JSON object"),
        (_b64(b'{"a":' + b"[" * 600 + b"]" * 600 + b"}"), "nested deeper than 512 levels"),
        (b"A" * 3584, "X-Amz-Client-Context is longer than 3583 bytes"),
    ],
)
async def test_api_bad_client_context_is_invalid_request_content(
    listeners: Listeners, context: bytes, problem: str
):
    status, headers, body, _ = await listeners.api("echo", [("X-Amz-Client-Context", context)])
    assert status == 400 and headers["x-amzn-errortype"] == ["InvalidRequestContentException"]
    assert problem in message(body)


async def test_api_authorization_not_utf8_is_401(tmp_path: Path):
    token = tmp_path / "api.token"
    token.write_text("s3cret\n")
    config = write_config(
        tmp_path, f'[functions.echo]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n'
    )
    config.write_text(config.read_text().replace("[api]\n", f'[api]\ntoken_file = "{token}"\n'))
    daemon = Daemon(config)
    await daemon.start()
    try:
        path = "/2015-03-31/functions/echo/invocations"
        for value in (b"Bearer s3cr\xfft", b"AWS4-HMAC-SHA256 Credential=\xff/x/y"):
            status, headers, _, _ = await send(
                daemon.api_port, request("POST", path, [("Authorization", value)], b"{}")
            )
            assert status == 401 and headers["x-amzn-errortype"] == ["UnrecognizedClientException"]
        status, _, _ = await daemon.invoke("echo", {}, headers={"Authorization": "Bearer s3cret"})
        assert status == 200
        assert errors_since(daemon, 0) == []
    finally:
        await daemon.close()


# --- JSON nested too deep -----------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def test_api_json_nested_too_deep_is_invalid_request_content(listeners: Listeners):
    mark = listeners.daemon.log_mark()
    for depth, kind in ((1000, "RequestResponse"), (MAX_JSON_DEPTH + 1, "Event"), (100_000, "")):
        headers = {"X-Amz-Invocation-Type": kind} if kind else {}
        status, headers_out, body = await listeners.daemon.invoke(
            "echo", raw=nested(depth), headers=headers
        )
        assert status == 400, depth
        assert headers_out["x-amzn-ErrorType"] == "InvalidRequestContentException"
        assert message(body).endswith(f"nested deeper than {MAX_JSON_DEPTH} levels")
    assert errors_since(listeners.daemon, mark) == []


async def test_api_json_at_the_depth_bound_runs_and_is_recorded(listeners: Listeners):
    status, headers, body = await listeners.daemon.invoke("echo", raw=nested(MAX_JSON_DEPTH))
    assert status == 200 and "X-Amz-Function-Error" not in headers
    event = json.loads(body)["event"]
    depth = 0
    while event != []:
        event, depth = event[0], depth + 1
    assert depth == MAX_JSON_DEPTH - 1  # the innermost [] is `event`
    record = await listeners.daemon.get(f"/v1/invocations/{headers['x-amzn-RequestId']}")
    assert record["status"] == "succeeded" and isinstance(record["event"], list)


async def test_api_result_nested_too_deep_is_answered_and_shown(listeners: Listeners):
    mark = listeners.daemon.log_mark()
    status, headers, body = await listeners.daemon.invoke("deep", {"depth": 3000})
    assert (status, body) == (200, nested(3000))  # the Invoke API passes a result on as it is
    assert listeners.daemon.session is not None
    url = f"{listeners.daemon.base}/v1/invocations/{headers['x-amzn-RequestId']}"
    async with listeners.daemon.session.get(url) as resp:
        assert resp.status == 200
        record = await resp.json()
    assert record["result"] == nested(3000).decode()  # shown as text, not parsed
    assert errors_since(listeners.daemon, mark) == []


async def test_api_boto3_deep_payload_raises_invalid_request_content(listeners: Listeners):
    import boto3
    from botocore.config import Config as BotoConfig

    def call() -> Any:
        client = boto3.client(
            "lambda",
            endpoint_url=listeners.daemon.base,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=BotoConfig(retries={"max_attempts": 1}),
        )
        try:
            client.invoke(FunctionName="echo", Payload=nested(1000))
        except client.exceptions.InvalidRequestContentException as exc:
            return exc.response
        return None

    response = await asyncio.to_thread(call)
    assert response is not None
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "nested deeper than" in response["Error"]["Message"]


async def test_webhook_json_body_nested_too_deep_is_400(listeners: Listeners):
    mark = listeners.daemon.log_mark()
    json_type = [("Content-Type", "application/json")]
    status, _, body, _ = await listeners.hook("POST", "/respond", json_type, nested(1000))
    assert status == 400
    assert (
        message(body) == f"Bad Request: the JSON body is nested deeper than {MAX_JSON_DEPTH} levels"
    )
    vnd = [("Content-Type", "application/vnd.github+json")]
    status, _, _, _ = await listeners.hook("POST", "/async", vnd, nested(MAX_JSON_DEPTH + 1))
    assert status == 400
    # at the bound, the handler gets it, parses it and answers with it
    status, _, body, _ = await listeners.hook("POST", "/respond", json_type, nested(MAX_JSON_DEPTH))
    assert status == 200 and body == nested(MAX_JSON_DEPTH)
    assert errors_since(listeners.daemon, mark) == []


async def test_webhook_result_nested_too_deep_is_502_with_the_reason_logged(listeners: Listeners):
    mark = listeners.daemon.log_mark()
    status, headers, body, _ = await listeners.hook("POST", "/deep?depth=3000")
    assert (status, message(body)) == (502, "Internal Server Error")
    invocation_id = headers["x-amzn-requestid"][0]
    logged = await listeners.daemon.wait_log(
        "webhook_bad_response", since=mark, invocation_id=invocation_id
    )
    assert logged[0]["error"] == f"the result is nested deeper than {MAX_JSON_DEPTH} levels"
    assert errors_since(listeners.daemon, mark) == []


# --- a handler's sync answer ---------------------------------------------------------------------


async def respond(
    listeners: Listeners, result: Any
) -> tuple[int, dict[str, list[str]], bytes, bytes]:
    body = json.dumps(result).encode()
    return await listeners.hook("POST", "/respond", [("Content-Type", "application/json")], body)


@pytest.mark.parametrize(
    "result",
    [
        {"statusCode": 200, "headers": {"Bad Name": "x"}},
        {"statusCode": 200, "headers": {"X-Split:": "x"}},
        {"statusCode": 200, "headers": {"": "x"}},
        {"statusCode": 200, "headers": {"X-Ctl": "a\x01b"}},
        {"statusCode": 200, "headers": {"X-Del": "a\x7fb"}},
        {"statusCode": 200, "headers": {"X-Nul": "a\x00b"}},
        {"statusCode": 200, "multiValueHeaders": {"X-M": ["ok", "a\nb"]}},
        {"statusCode": 200, "multiValueHeaders": {"X-M": "not a list"}},
        {"statusCode": 200, "multiValueHeaders": {"X M": ["x"]}},
        {"statusCode": 200, "multiValueHeaders": {"Set-Cookie": ["a=1\r\nX-Injected: 1"]}},
        {"statusCode": 200, "multiValueHeaders": ["X-M"]},
    ],
)
async def test_webhook_response_with_a_bad_header_is_502(listeners: Listeners, result: Any):
    mark = listeners.daemon.log_mark()
    status, headers, body, rest = await respond(listeners, result)
    assert (status, message(body), rest) == (502, "Internal Server Error", b"")
    assert "x-injected" not in headers
    invocation_id = headers["x-amzn-requestid"][0]
    logged = await listeners.daemon.wait_log(
        "webhook_bad_response", since=mark, invocation_id=invocation_id
    )
    assert logged[0]["level"] == "warning" and logged[0]["error"]


async def test_webhook_response_multi_value_headers_are_merged(listeners: Listeners):
    result = {
        "statusCode": 200,
        "headers": {"X-M": "two", "X-S": "single", "X-Tab": "a\tb", "Content-Length": "1"},
        "multiValueHeaders": {"X-M": ["one", "two"], "Set-Cookie": ["a=1", "b=2"]},
        "body": "ok",
    }
    status, headers, body, rest = await respond(listeners, result)
    assert (status, body, rest) == (200, b"ok", b"")
    assert headers["x-m"] == ["one", "two"]  # a pair given in both appears once
    assert headers["x-s"] == ["single"] and headers["x-tab"] == ["a\tb"]
    assert headers["set-cookie"] == ["a=1", "b=2"]
    assert headers["content-length"] == ["2"]  # the server's own, not the handler's


@pytest.mark.parametrize("code", [204, 304])
async def test_webhook_no_body_status_drops_the_body(listeners: Listeners, code: int):
    smuggled = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!"
    result = {"statusCode": code, "headers": {"X-A": "1"}, "body": smuggled}
    status, headers, body, rest = await respond(listeners, result)
    assert (status, body, rest) == (code, b"", b"")  # nothing after the head
    assert headers["x-a"] == ["1"] and "content-type" not in headers


# --- replayed signatures -------------------------------------------------------------------------


def signed(body: bytes, stamp: int | None = None) -> list[tuple[str, str]]:
    stamp = int(time.time()) if stamp is None else stamp
    mac = hmac.new(SECRET.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return [("X-Timestamp", str(stamp)), ("X-Signature", "v0=" + mac)]


@pytest.mark.parametrize(("path", "ok"), [("/signed", 200), ("/signed-async", 202)])
async def test_webhook_replayed_signature_is_409(listeners: Listeners, path: str, ok: int):
    mark = listeners.daemon.log_mark()
    body = json.dumps({"nonce": path, "at": time.time()}).encode()
    headers = signed(body)
    status, _, _, _ = await listeners.hook("POST", path, headers, body)
    assert status == ok
    for _ in range(2):
        status, _, answer, _ = await listeners.hook("POST", path, headers, body)
        assert (status, message(answer)) == (
            409,
            "Conflict: this signed request was received before",
        )
    # on any route of the listener: the signature does not cover the path
    other = "/signed" if path == "/signed-async" else "/signed-async"
    status, _, _, _ = await listeners.hook("POST", other, headers, body)
    assert status == 409
    replays = await listeners.daemon.wait_log(
        "webhook_rejected", 3, since=mark, reason="auth_replayed"
    )
    assert [e["status"] for e in replays] == [409, 409, 409]
    assert replays[-1]["level"] == "warning"
    # another body, or the same body signed at another second, is another request
    status, _, _, _ = await listeners.hook("POST", path, signed(body + b" "), body + b" ")
    assert status == ok
    status, _, _, _ = await listeners.hook("POST", path, signed(body, int(time.time()) - 5), body)
    assert status == ok


async def test_webhook_signed_request_refused_after_the_check_may_be_sent_again(
    listeners: Listeners,
):
    body = json.dumps({"nonce": "refused", "at": time.time()}).encode()
    headers = signed(body)
    # refused for a header that is not UTF-8, after its signature was found good
    status, _, _, _ = await listeners.hook("POST", "/signed", [*headers, ("X-Bad", b"\xff")], body)
    assert status == 400
    status, _, _, _ = await listeners.hook("POST", "/signed", headers, body)
    assert status == 200
    status, _, _, _ = await listeners.hook("POST", "/signed", headers, body)
    assert status == 409


async def test_webhook_replay_memory_outlives_a_reload(tmp_path: Path):
    (tmp_path / "secret").write_text(SECRET + "\n")
    port = free_port()
    daemon = Daemon(write_config(tmp_path, body_toml(port)))
    await daemon.start()
    try:
        await daemon.wait_log("webhook_listening")
        body = b'{"nonce": "reload"}'
        headers = signed(body)
        status, _, _, _ = await send(port, request("POST", "/signed", headers, body))
        assert status == 200
        # new routes and limits on the same listener: every check is built anew
        write_config(tmp_path, body_toml(port, 65537), api_port=daemon.api_port)
        await daemon.signal(signal.SIGHUP)
        await daemon.wait_log("webhook_routes_updated")
        status, _, _, _ = await send(port, request("POST", "/signed", headers, body))
        assert status == 409
    finally:
        await daemon.close()
