"""Webhook routes as Lambda web apps need them: greedy paths, ANY and HEAD, the matched route in
the event, API Gateway REST (payload 1.0) events and responses, and Function URL CORS.

Real clients on both ends: aiohttp over loopback to the real daemon (a subprocess), and
aws-lambda-powertools' resolvers as the handlers, routing by the event as they do on AWS.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aws_lambda_powertools.utilities.data_classes import (
    APIGatewayProxyEvent,
    APIGatewayProxyEventV2,
    LambdaFunctionUrlEvent,
)
from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayProxyEventModel,
    APIGatewayProxyEventV2Model,
    LambdaFunctionUrlModel,
)
from multidict import CIMultiDict

from tests.daemon_proc import Daemon, free_port, write_config
from triggers.webhook import NoCheck, Route, RouteTable, parse_path

pytestmark = pytest.mark.asyncio(loop_scope="module")

FUNCS = Path(__file__).resolve().parent / "functions"
ORIGIN = "https://app.example"


def body_toml(port: int) -> str:
    cors = (
        f'{{ allow_origins = ["{ORIGIN}"], allow_methods = ["GET", "POST"], '
        'allow_headers = ["content-type", "x-api-key"], expose_headers = ["x-request-id"], '
        "max_age = 600, allow_credentials = true }"
    )
    return f"""
[webhooks]
listen = "127.0.0.1:{port}"

[functions.shop]
handler = "handler.url"
code = "{FUNCS / "webhook_powertools"}"
concurrency = 2

[[functions.shop.triggers]]
type = "webhook"
path = "/items/{{proxy+}}"
methods = ["GET"]
cors = {cors}

[[functions.shop.triggers]]
type = "webhook"
path = "/items"
methods = ["POST"]
cors = {cors}

[functions.httpapi]
handler = "handler.http"
code = "{FUNCS / "webhook_powertools"}"
triggers = [{{ type = "webhook", path = "/h/{{proxy+}}" }}]

[functions.rest]
handler = "handler.rest"
code = "{FUNCS / "webhook_powertools"}"
triggers = [{{ type = "webhook", path = "/v1/{{proxy+}}", payload_format = "1.0" }}]

[functions.fastapi]
handler = "handler.handler"
code = "{FUNCS / "webhook_fastapi"}"
timeout_s = 10
triggers = [
    {{ type = "webhook", path = "/fa/{{proxy+}}" }},
    {{ type = "webhook", path = "/fa1/{{proxy+}}", payload_format = "1.0" }},
]

[functions.mirror]
handler = "handler.handler"
code = "{FUNCS / "webhook_mirror"}"
concurrency = 2

[[functions.mirror.triggers]]
type = "webhook"
path = "/items/deep/*"

[[functions.mirror.triggers]]
type = "webhook"
path = "/items/special"
methods = ["GET"]

[[functions.mirror.triggers]]
type = "webhook"
path = "/raw1/{{proxy+}}"
payload_format = "1.0"

[[functions.mirror.triggers]]
type = "webhook"
path = "/secure/*"
auth = {{ type = "token", token_file = "token" }}

[[functions.mirror.triggers]]
type = "webhook"
path = "/open/*"
cors = {{ allow_origins = ["*"] }}

[functions.respond]
handler = "handler.handler"
code = "{FUNCS / "webhook_respond"}"
triggers = [{{ type = "webhook", path = "/respond1", payload_format = "1.0" }}]
"""


class Client:
    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon, self.base = daemon, f"http://127.0.0.1:{port}"

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, bytes]:
        assert self.daemon.session is not None
        async with self.daemon.session.request(method, self.base + path, **kwargs) as resp:
            return resp.status, resp.headers, await resp.read()

    async def event(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The event the mirror function got for this request."""
        status, _, body = await self.request(method, path, **kwargs)
        assert status == 200, body
        return json.loads(body)["event"]  # type: ignore[no-any-return]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tmp_path_factory):
    port = free_port()
    tmp = tmp_path_factory.mktemp("routes")
    (tmp / "token").write_text("tok-routes\n")
    daemon = Daemon(write_config(tmp, body_toml(port)))
    try:
        await daemon.start()
        await daemon.wait_log("webhook_listening", timeout_s=10)
        yield Client(daemon, port)
    finally:
        await daemon.close()


# --- which route serves a path ----------------------------------------------------------------


async def test_powertools_function_url_app_routes_behind_a_greedy_route(client: Client):
    status, _, body = await client.request("GET", "/items/42?q=red")
    assert status == 200 and json.loads(body) == {"id": "42", "q": "red", "method": "GET"}
    status, headers, body = await client.request("POST", "/items", json={"name": "lamp"})
    assert status == 201 and json.loads(body) == {"name": "lamp"}
    assert headers.getall("Set-Cookie") == ["a=1; Secure", "b=2; Secure"]


async def test_powertools_http_api_app_routes_behind_a_greedy_route(client: Client):
    status, _, body = await client.request("PATCH", "/h/items/3?q=x")  # ANY: the app decides
    assert status == 404 and json.loads(body) == {"statusCode": 404, "message": "Not found"}
    status, _, body = await client.request("GET", "/h/items/3?q=x")
    assert status == 200 and json.loads(body) == {"id": "3", "q": "x", "method": "GET"}
    status, headers, _ = await client.request("POST", "/h/items", json={})
    assert status == 201 and len(headers.getall("Set-Cookie")) == 2


@pytest.mark.parametrize(
    ("path", "route_key", "proxy"),
    [
        ("/items/special", "GET /items/special", None),  # exact beats greedy
        ("/items/deep/a/b", "ANY /items/deep/{proxy+}", "a/b"),  # the longer prefix wins
        ("/items/deep/x%20y/", "ANY /items/deep/{proxy+}", "x y/"),  # decoded, slash kept
    ],
)
async def test_most_specific_route_wins(
    client: Client, path: str, route_key: str, proxy: str | None
):
    event = await client.event("GET", path)
    assert event["routeKey"] == route_key == event["requestContext"]["routeKey"]
    assert event["rawPath"] == path
    assert event.get("pathParameters") == (None if proxy is None else {"proxy": proxy})


async def test_a_shorter_greedy_route_takes_what_the_longer_does_not(client: Client):
    status, _, body = await client.request("GET", "/items/deeper")  # not under /items/deep/
    assert status == 200 and json.loads(body)["id"] == "deeper"


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/items", 405, "POST"),  # /items/{proxy+} never matches its parent
        ("GET", "/items/", 404, None),  # nor the parent with a slash: the rest is empty
        ("DELETE", "/items/7", 405, "GET, HEAD"),
        ("GET", "/raw1", 404, None),
    ],
)
async def test_greedy_route_trailing_slash_and_method_rules(
    client: Client, method: str, path: str, status: int, allow: str | None
):
    got, headers, _ = await client.request(method, path)
    assert (got, headers.get("Allow")) == (status, allow)


async def test_parent_of_a_greedy_route_with_a_slash_goes_to_a_shorter_one(client: Client):
    # /items/deep/* does not match /items/deep/, so /items/{proxy+} does: the app's own 404.
    status, _, body = await client.request("GET", "/items/deep/")
    assert status == 404 and json.loads(body) == {"statusCode": 404, "message": "Not found"}


async def test_any_route_takes_every_method_and_says_which(client: Client):
    for method in ("DELETE", "PATCH", "PUT", "OPTIONS"):
        event = await client.event(method, "/items/deep/x")
        assert event["requestContext"]["http"]["method"] == method
        assert event["routeKey"] == "ANY /items/deep/{proxy+}"


async def test_head_is_served_by_the_get_route_without_a_body(client: Client):
    _, get_headers, get_body = await client.request("GET", "/items/9?q=z")
    status, headers, body = await client.request("HEAD", "/items/9?q=z")
    assert status == 200 and body == b""
    # The handler answered as for GET: the same length, announced and not sent.
    assert headers["Content-Length"] == get_headers["Content-Length"] == str(len(get_body))


async def test_v2_event_parses_with_powertools_data_classes(client: Client):
    event = await client.event("PUT", "/items/deep/a/b?x=1&x=2", data=b"hi")
    http_api, url = APIGatewayProxyEventV2(event), LambdaFunctionUrlEvent(event)
    assert http_api.route_key == "ANY /items/deep/{proxy+}"
    assert http_api.path_parameters == {"proxy": "a/b"} and http_api.raw_path == "/items/deep/a/b"
    assert http_api.query_string_parameters == {"x": "1,2"}
    assert url.request_context.http.method == "PUT" and url.request_context.stage == "$default"
    assert url.decoded_body == "hi"
    # Powertools' pydantic models, as a parser-validated handler would read it
    assert APIGatewayProxyEventV2Model.model_validate(event).pathParameters == {"proxy": "a/b"}
    assert LambdaFunctionUrlModel.model_validate(event).rawPath == "/items/deep/a/b"


async def test_fastapi_behind_mangum_routes_with_query_cookies_and_binary_bodies(
    client: Client,
):
    status, _, body = await client.request(
        "GET", "/fa/items/5?q=blue", headers={"Cookie": "session=s1; other=x"}
    )
    assert status == 200 and json.loads(body) == {"id": "5", "q": "blue", "session": "s1"}
    payload = bytes(range(256))
    status, headers, body = await client.request(
        "POST", "/fa/blob", data=payload, headers={"Content-Type": "application/octet-stream"}
    )
    assert status == 200 and body == payload[::-1]  # base64 both ways, bytes intact
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers.getall("Set-Cookie")[0].startswith("seen=256")


async def test_fastapi_behind_mangum_on_a_payload_1_0_route(client: Client):
    status, _, body = await client.request(
        "GET", "/fa1/items/6?q=red", headers={"Cookie": "session=s2"}
    )
    assert status == 200 and json.loads(body) == {"id": "6", "q": "red", "session": "s2"}
    status, _, body = await client.request("GET", "/fa1/nothing")
    assert status == 404 and json.loads(body) == {"detail": "Not Found"}  # the app's own


# --- payload format 1.0 (API Gateway REST) ----------------------------------------------------


async def test_v1_event_is_api_gateway_rest_proxy(client: Client):
    headers = CIMultiDict(
        [("X-Multi", "one"), ("X-Multi", "two"), ("User-Agent", "tester/1"), ("Cookie", "k=v")]
    )
    event = await client.event("GET", "/raw1/a/b%20c?x=1&x=2&y=", headers=headers)
    assert event["resource"] == "/raw1/{proxy+}" and event["path"] == "/raw1/a/b%20c"
    assert event["httpMethod"] == "GET" and event["pathParameters"] == {"proxy": "a/b c"}
    assert event["headers"]["X-Multi"] == "two" and event["headers"]["Cookie"] == "k=v"
    assert event["multiValueHeaders"]["X-Multi"] == ["one", "two"]
    assert event["queryStringParameters"] == {"x": "2", "y": ""}
    assert event["multiValueQueryStringParameters"] == {"x": ["1", "2"], "y": [""]}
    assert event["body"] is None and event["isBase64Encoded"] is False
    assert event["stageVariables"] is None
    ctx = event["requestContext"]
    assert ctx["resourcePath"] == "/raw1/{proxy+}" and ctx["httpMethod"] == "GET"
    assert ctx["identity"]["sourceIp"] == "127.0.0.1" and ctx["identity"]["user"] is None
    assert ctx["identity"]["userAgent"] == "tester/1" and ctx["protocol"] == "HTTP/1.1"
    assert type(ctx["requestTimeEpoch"]) is int and ctx["requestId"]
    parsed = APIGatewayProxyEvent(event)
    assert parsed.resource == "/raw1/{proxy+}" and parsed.path_parameters == {"proxy": "a/b c"}
    assert parsed.request_context.identity.source_ip == "127.0.0.1"
    assert parsed.multi_value_query_string_parameters == {"x": ["1", "2"], "y": [""]}
    model = APIGatewayProxyEventModel.model_validate(event)
    assert model.resource == "/raw1/{proxy+}" and model.requestContext.stage == "$default"


async def test_v1_event_without_query_or_body_has_nulls(client: Client):
    event = await client.event("POST", "/raw1/x", data=bytes(range(4)))
    assert event["queryStringParameters"] is None
    assert event["multiValueQueryStringParameters"] is None
    assert event["body"] == "AAECAw==" and event["isBase64Encoded"] is True


async def test_powertools_rest_app_routes_and_sets_cookies_through_multi_value_headers(
    client: Client,
):
    status, _, body = await client.request("GET", "/v1/items/9?q=a&q=b")
    assert status == 200 and json.loads(body) == {"id": "9", "q": "b", "method": "GET"}
    status, headers, body = await client.request("POST", "/v1/items", json=[1])
    assert status == 201 and json.loads(body) == [1]
    assert headers.getall("Set-Cookie") == ["a=1; Secure", "b=2; Secure"]


async def test_v1_response_mapping(client: Client):
    result = {
        "statusCode": 207,
        "headers": {"X-A": "single", "X-B": "only"},
        "multiValueHeaders": {"X-A": ["m1", "m2"]},
        "body": "ok",
        "cookies": ["ignored=1"],  # not a payload 1.0 field
    }
    status, headers, body = await client.request("POST", "/respond1", json=result)
    assert status == 207 and body == b"ok"
    assert headers.getall("X-A") == ["m1", "m2"] and headers["X-B"] == "only"
    assert "Set-Cookie" not in headers


@pytest.mark.parametrize("result", [{"hello": 1}, "text", [1, 2]])
async def test_v1_result_without_status_code_is_502(client: Client, result: Any):
    status, _, body = await client.request("POST", "/respond1", json=result)
    assert status == 502 and json.loads(body) == {"message": "Internal server error"}


# --- CORS -------------------------------------------------------------------------------------


async def shop_calls(client: Client) -> int:
    await client.daemon.barrier()
    return len(await client.daemon.invocations(function="shop"))


@pytest.mark.parametrize(("method", "path"), [("GET", "/items/7"), ("POST", "/items")])
async def test_cors_preflight_is_answered_without_the_function(
    client: Client, method: str, path: str
):
    before = await shop_calls(client)
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-type",
    }
    status, headers, body = await client.request("OPTIONS", path, headers=preflight)
    assert status == 200 and body == b""
    assert headers["Access-Control-Allow-Origin"] == ORIGIN and headers["Vary"] == "Origin"
    assert headers["Access-Control-Allow-Methods"] == "GET, POST"
    assert headers["Access-Control-Allow-Headers"] == "content-type, x-api-key"
    assert headers["Access-Control-Max-Age"] == "600"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert await shop_calls(client) == before


async def test_cors_preflight_from_another_origin_gets_no_cors_headers(client: Client):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    status, headers, _ = await client.request("OPTIONS", "/items/7", headers=preflight)
    assert status == 200 and not any(h.startswith("Access-Control-") for h in headers)


async def test_options_that_is_no_preflight_is_routed_as_any_method(client: Client):
    status, headers, _ = await client.request("OPTIONS", "/items/7", headers={"Origin": ORIGIN})
    assert status == 405 and headers["Allow"] == "GET, HEAD"


async def test_cors_headers_on_responses_to_allowed_origins_only(client: Client):
    status, headers, _ = await client.request("GET", "/items/7", headers={"Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Access-Control-Expose-Headers"] == "x-request-id"
    assert headers["Access-Control-Allow-Credentials"] == "true" and headers["Vary"] == "Origin"
    _, headers, _ = await client.request("GET", "/items/7", headers={"Origin": "https://x.example"})
    assert not any(h.startswith("Access-Control-") for h in headers)
    _, headers, _ = await client.request("GET", "/open/x", headers={"Origin": "https://x.example"})
    assert headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in headers


# --- answered from the head ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        ("POST /items/ HTTP/1.1", 404),  # no route: the greedy one needs a non-empty rest
        ("DELETE /items/7 HTTP/1.1", 405),
        ("POST /secure/x HTTP/1.1", 401),  # header auth on a greedy route
        ("GET /items/7 HTTP/1.1", 413),  # over max_body_bytes
        (
            f"OPTIONS /items/7 HTTP/1.1\r\nOrigin: {ORIGIN}\r\nAccess-Control-Request-Method: GET",
            200,
        ),
    ],
)
async def test_greedy_routes_answer_from_the_head_before_the_body(
    client: Client, head: str, status: int
):
    port = int(client.base.rpartition(":")[2])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:  # 50 MB announced, not one byte of it sent
        writer.write(f"{head}\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n".encode())
        async with asyncio.timeout(10):
            assert int((await reader.readline()).split()[1]) == status
            while await reader.readline() not in (b"\r\n", b""):
                pass
            await reader.read()  # the rest of the answer, then the end: the body is not awaited
    finally:
        writer.close()


# --- the route table alone ----------------------------------------------------------------------


def table(*routes: str) -> RouteTable:
    """Routes written as "METHOD path", each named by itself as its function."""
    built = []
    for spec in routes:
        method, path = spec.split()
        resource, param = parse_path(path)
        prefix = resource.rpartition("/")[0] + "/" if param else resource
        built.append(
            Route(spec, "t#0", path, "sync", NoCheck(), method, resource, param, prefix, spec)
        )
    return RouteTable(built)


@pytest.mark.parametrize(
    ("method", "path", "served_by"),
    [
        ("GET", "/pets/dog/1", "GET /pets/dog/1"),  # API Gateway's example, in our forms
        ("GET", "/pets/cat/1", "GET /pets/*"),
        ("POST", "/test/5", "ANY /{proxy+}"),
        ("POST", "/pets/dog/1", "ANY /{proxy+}"),  # the exact path lacks POST: the next route
        ("DELETE", "/pets/cat", "DELETE /pets/cat"),  # a listed method before ANY at one path
        ("PUT", "/pets/cat", "ANY /pets/cat"),
        ("HEAD", "/pets/dog/1", "GET /pets/dog/1"),  # HEAD falls back on GET
        ("HEAD", "/pets/cat", "ANY /pets/cat"),  # but ANY takes it first
        ("GET", "/", None),  # /{proxy+} needs a non-empty rest
        ("GET", "/pets/", "ANY /{proxy+}"),  # /pets/* does not match its parent: /{proxy+} does
    ],
)
async def test_route_table_picks_the_most_specific_route(
    method: str, path: str, served_by: str | None
):
    routes = table(
        "GET /pets/dog/1",
        "GET /pets/*",
        "ANY /{proxy+}",
        "DELETE /pets/cat",
        "ANY /pets/cat",
    )
    route = routes.find(path, method)
    assert (route.function if route else None) == served_by


async def test_route_table_allow_lists_the_methods_of_every_matching_route():
    routes = table("GET /a/b", "POST /a/*", "PUT /z")
    assert routes.allow("/a/b") == "GET, HEAD, POST"
    assert routes.allow("/a") is None and routes.find("/a/b", "DELETE") is None


async def test_a_reload_swaps_greedy_routes_in_place(tmp_path: Path):
    def config(port: int, routes: list[str]) -> str:
        triggers = ", ".join(f'{{ type = "webhook", path = "{path}" }}' for path in routes)
        code = FUNCS / "webhook_mirror"
        return (
            f'[webhooks]\nlisten = "127.0.0.1:{port}"\n[functions.mirror]\n'
            f'handler = "handler.handler"\ncode = "{code}"\ntriggers = [{triggers}]\n'
        )

    port = free_port()
    daemon = Daemon(write_config(tmp_path, config(port, ["/a/{proxy+}"])))
    await daemon.start()
    try:
        await daemon.wait_log("webhook_listening")
        hooks = Client(daemon, port)
        assert (await hooks.event("GET", "/a/b/c"))["routeKey"] == "ANY /a/{proxy+}"
        write_config(tmp_path, config(port, ["/a/{proxy+}", "/a/b/*"]), api_port=daemon.api_port)
        await daemon.signal(signal.SIGHUP)
        await daemon.wait_log("webhook_routes_updated")
        event = await hooks.event("GET", "/a/b/c")  # the new, longer prefix wins at once
        assert event["routeKey"] == "ANY /a/b/{proxy+}" and event["pathParameters"] == {
            "proxy": "c"
        }
        write_config(tmp_path, config(port, ["/x"]), api_port=daemon.api_port)
        await daemon.signal(signal.SIGHUP)
        await daemon.wait_log("webhook_routes_updated", count=2)
        assert (await hooks.request("GET", "/a/b/c"))[0] == 404
    finally:
        await daemon.close()
