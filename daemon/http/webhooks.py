"""Webhook serving: the HTTP side of the webhook trigger kind (triggers/webhook.py).

One aiohttp app on `webhooks.listen` answers every request by the source's route table
(triggers/webhook.py's RouteTable: exact paths, then greedy prefixes). A request is matched on its
path and method, held to `max_body_bytes`, checked by its route's auth and turned into an event:
API Gateway's HTTP API payload 2.0 (the Function URL event, plus the matched `routeKey` and a
greedy route's `pathParameters`), or with `payload_format = "1.0"` the REST API proxy event.
`mode = "sync"` runs the function now and maps its result to the response by the same format's
rules; `mode = "async"` answers 202 only once the event is committed. A CORS preflight to a route
with `cors` is answered from its settings without running the function. A refused request is
counted in the source's `rejected` and logged without any secret.

The webhook source imports this module only when it runs, so loading a config never loads aiohttp
or the daemon's HTTP stack.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from binascii import b2a_base64
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web
from multidict import CIMultiDict

from daemon.errors import (
    QueueFullError,
    ShuttingDownError,
    StoreUnavailableError,
    UnknownFunctionError,
)
from daemon.http.api import start_site
from daemon.http.wire import STATS, AnyRequest, Handler, WireRequest
from daemon.logs import Throttle
from daemon.models import Outcome, Status, new_id
from daemon.untrusted import MAX_JSON_DEPTH, is_utf8, json_too_deep
from triggers.base import Emit

if TYPE_CHECKING:
    from triggers.webhook import CorsPolicy, Route, WebhookSource

log = structlog.get_logger("lambdaemon.webhook")

# Headers by which senders name one delivery; a re-sent delivery keeps it, so it is deduplicated.
DELIVERY_HEADERS = (
    "Idempotency-Key",
    "X-GitHub-Delivery",
    "X-Gitea-Delivery",
    "X-Gitlab-Event-UUID",
)
# Bodies of these types reach the handler as text; any other body is base64 (as Function URLs do).
TEXT_TYPES = re.compile(
    r"text/.+|application/(?:[\w.+-]+\+)?(?:json|xml)"
    r"|application/(?:x-www-form-urlencoded|javascript|x-ndjson|graphql)"
)
JSON_TYPES = re.compile(r"application/(?:[\w.+-]+\+)?json")
# What a handler's response may put in a header (RFC 9110): a token as name, no control character
# but tab in a value. Anything else would let a handler's output write the head itself.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")
# Framing and hop-by-hop headers are the server's own; a handler's are dropped.
_NOT_FORWARDED = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "trailer"}
)
_NO_BODY = frozenset({204, 304})  # a body after these heads would be read as the next response
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode


class WebhookServer:
    """The listener of one run of `source`: its routes, limits and counters are the source's,
    read per request, so a reload's `update()` takes effect at once on the same socket."""

    def __init__(self, source: WebhookSource, emit: Emit) -> None:
        self.source, self.emit = source, emit
        self.draining = False  # once set, requests that still slip in get 503
        self._throttle = Throttle()  # webhook_rejected lines, per reason
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen on the source's `listen`; return the bound port (`listen` may say 0)."""
        source = self.source
        app = web.Application(client_max_size=source.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)  # our own table decides 404/405
        self._runner = await start_site(
            app,
            source.listen,
            "webhooks.listen",
            drain_s=source.drain_s,
            router=self._route,
            max_body=lambda: self.source.max_body_bytes,
            limits=lambda: self.source.limits,
        )
        STATS["webhooks.listen"].rejected = source.rejected  # shown on /health beside the rest
        port: int = self._runner.addresses[0][1]
        return port

    async def stop(self) -> None:
        """Take no new connections and refuse new requests; in-flight ones get `drain_s`."""
        self.draining = True
        if self._runner is None:
            return
        for site in list(self._runner.sites):
            await site.stop()  # no new connections from here on
        log.info("webhook_draining", drain_s=self.source.drain_s)
        await self._runner.cleanup()  # in-flight requests get up to drain_s to finish

    def _route(self, request: WireRequest) -> Handler | web.StreamResponse:
        """On the request's head alone: refuse what no body can make right (unknown route, wrong
        method, draining, a failed header check, a body announced over the limit) before a
        byte of the body is read; the rest goes to `_handle` once the body is here."""
        refused = self._refuse_head(request)
        return refused if refused is not None else self._handle

    def _refuse_head(self, request: AnyRequest) -> web.Response | None:
        route = self.source.routes.find(request.path, request.method)
        if route is None or (route.cors is not None and request.method == "OPTIONS"):
            if request.method == "OPTIONS" and (preflight := self._preflight(request)):
                return preflight
            if route is None:
                return self._unrouted(request)
        if self.draining:
            busy = {"Retry-After": "5", "Connection": "close"}
            return self._reject(request, route, "draining", 503, "Service Unavailable", busy)
        check = route.check
        if not check.needs_body and (reason := check.check(request.headers, b"")):
            return self._reject(request, route, reason, 401, "Unauthorized", check.challenge)
        if (request.content_length or 0) > self.source.max_body_bytes:
            return self._reject(request, route, "too_large", 413, "Request Entity Too Large")
        return None

    def _preflight(self, request: AnyRequest) -> web.Response | None:
        """A CORS preflight's answer from its route's settings, or None if it is none.

        A preflight asks about the method to come, so the route that would serve that method
        answers it, whatever serves OPTIONS; the function never runs for it.
        """
        asked = request.headers.get(_ASKED_METHOD)
        route = self.source.routes.find(request.path, asked) if asked else None
        if route is None or route.cors is None:
            return None
        headers = route.cors.headers(request.headers.get("Origin"), preflight=True)
        log.debug("webhook_preflight", route=route.path, allowed=headers is not None)
        return web.Response(status=200, headers=headers)

    def _unrouted(self, request: AnyRequest) -> web.Response:
        """404, or 405 with `Allow` when a route has the path but not the method."""
        allow = self.source.routes.allow(request.path)
        if allow is None:
            return self._reject(request, None, "not_found", 404, "Not Found")
        return self._reject(
            request, None, "method_not_allowed", 405, "Method Not Allowed", {"Allow": allow}
        )

    async def _handle(self, request: AnyRequest) -> web.StreamResponse:
        # Checked again: aiohttp alone (tests) and a route swapped by a reload come here unchecked.
        if (refused := self._refuse_head(request)) is not None:
            return refused
        route = self.source.routes.find(request.path, request.method)
        assert route is not None  # _refuse_head found it
        check = route.check
        body = await self._read_body(request)
        if body is None:
            return self._reject(request, route, "too_large", 413, "Request Entity Too Large")
        if check.needs_body and (reason := check.check(request.headers, body)):
            if reason == "auth_replayed":
                return self._reject(request, route, reason, 409, _REPLAYED)
            return self._reject(request, route, reason, 401, "Unauthorized", check.challenge)
        problem = _body_problem(request, body)
        build = build_v1_event if route.v1 else build_event
        try:
            event = _encode(build(request, body, self.source.port, route, check.redact))
        except UnicodeEncodeError:  # bytes that are not UTF-8: say where, without parsing twice
            problem = problem or _undecodable(request, check.redact)
        if problem is None:
            if route.mode == "async":
                response = await self._accept(request, route, event)
            else:
                response = await self._invoke(request, route, event)
            if route.cors is not None:
                _add_cors(response, route.cors, request.headers.get("Origin"))
            if response.status not in _NOT_TAKEN:
                return response
        else:
            response = self._reject(request, route, "bad_request", 400, f"Bad Request: {problem}")
        check.forget(request.headers)  # refused: the sender may send the same signature again
        return response

    async def _read_body(self, request: AnyRequest) -> bytes | None:
        limit = self.source.max_body_bytes  # read per request: a reload may change it in place
        if (request.content_length or 0) > limit:
            return None  # refused before a byte of it is read
        if isinstance(
            request, WireRequest
        ):  # framed by daemon/http/wire.py: all here, length known
            return request.content.data
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:  # a chunked body: stop reading at the limit, not after it
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _accept(self, request: AnyRequest, route: Route, event: bytes) -> web.Response:
        delivery = next((d for h in DELIVERY_HEADERS if (d := request.headers.get(h))), None)
        # The key is stored: bound its size, and keep bytes that are not UTF-8 out of the store.
        if delivery is not None and (len(delivery) > 128 or not is_utf8(delivery)):
            delivery = hashlib.sha256(delivery.encode("utf-8", "surrogateescape")).hexdigest()
        try:
            accepted = await self.emit(
                route.function,
                event,
                trigger="webhook",
                trigger_id=route.trigger_id,
                dedupe_key=f"webhook:{route.trigger_id}:{delivery}" if delivery else None,
            )
        except StoreUnavailableError as exc:
            log.error("webhook_store_unavailable", route=route.path, error=str(exc))
            return self._reject(
                request,
                route,
                "store_unavailable",
                503,
                "Service Unavailable",
                {"Retry-After": "5"},
            )
        except UnknownFunctionError:  # a reload removed it; the route goes with the next update
            return self._reject(
                request, route, "reloading", 503, "Service Unavailable", {"Retry-After": "1"}
            )
        self.source.accepted += 1
        log.info(
            "webhook_accepted",
            route=route.path,
            function=route.function,
            mode="async",
            invocation_id=accepted.invocation_id,
            duplicate=not accepted.created,
        )
        body = {"invocation_id": accepted.invocation_id, "duplicate": not accepted.created}
        return web.Response(
            status=202,
            body=_encode(body),
            content_type="application/json",
            headers={"x-amzn-RequestId": accepted.invocation_id},
        )

    async def _invoke(self, request: AnyRequest, route: Route, event: bytes) -> web.Response:
        try:
            invocation_id, outcome = await self.emit.invoke_sync(
                route.function, event, trigger="webhook", trigger_id=route.trigger_id
            )
        except QueueFullError:
            return self._reject(
                request, route, "queue_full", 429, "Too Many Requests", {"Retry-After": "1"}
            )
        except ShuttingDownError:  # it never started: the sender retries after the restart
            return self._reject(
                request,
                route,
                "draining",
                503,
                "Service Unavailable",
                {"Retry-After": "5", "Connection": "close"},
            )
        except UnknownFunctionError:
            return self._reject(
                request, route, "reloading", 503, "Service Unavailable", {"Retry-After": "1"}
            )
        self.source.accepted += 1
        response = to_response(invocation_id, outcome, v1=route.v1)
        # Debug: the dispatcher's invocation_finished already says it, on the hot path.
        log.debug(
            "webhook_accepted",
            route=route.path,
            function=route.function,
            mode="sync",
            invocation_id=invocation_id,
            status=response.status,
        )
        return response

    def _reject(
        self,
        request: AnyRequest,
        route: Route | None,
        reason: str,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        count = self.source.rejected[reason] = self.source.rejected[reason] + 1
        if route is not None and reason.startswith("auth_"):
            self.source.auth_failed[route.path] += 1
        suppressed = self._throttle.allow(reason, time.monotonic())
        if suppressed is not None:  # a flood of refusals is counted, not logged line by line
            emit_log = log.warning if reason.startswith("auth_") else log.info
            emit_log(
                "webhook_rejected",
                reason=reason,
                route=route.path if route else request.path[:200],
                remote=request.remote,
                status=status,
                count=count,
                suppressed=suppressed,
            )
        return _message(status, message, headers)


_REPLAYED = "Conflict: this signed request was received before"
_ASKED_METHOD = "Access-Control-Request-Method"  # present on a CORS preflight, and only there
# Statuses of a request the daemon did not take (queue full, draining, store down).
_NOT_TAKEN = frozenset({429, 503})


def _add_cors(response: web.Response, cors: CorsPolicy, origin: str | None) -> None:
    """The route's CORS headers on `response`, in place of any the function set: the same
    header twice (`*, *`) makes a browser refuse the response."""
    headers = cors.headers(origin)
    if headers is None:
        return
    vary = response.headers.get("Vary")
    for name, value in headers.items():
        response.headers[name] = value
    if vary is not None:  # keep what the function's response varies on
        as_is = "Vary" not in headers or "origin" in vary.lower()
        response.headers["Vary"] = vary if as_is else f"{vary}, Origin"


def _body_problem(request: AnyRequest, body: bytes) -> str | None:
    """Why the daemon refuses `body` before any handler sees it, or None.

    A route passes the body on as text and does not parse it, but a handler that does would
    fail on JSON nested past what Python's stack allows (see daemon/untrusted.py).
    """
    if body and JSON_TYPES.fullmatch(request.content_type) and json_too_deep(body):
        return f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels"
    return None


def _undecodable(request: AnyRequest, redact: str | None) -> str:
    """Which part of `request` holds bytes that are not UTF-8 (kept by aiohttp as surrogates)."""
    for name, value in request.headers.items():
        if not is_utf8(name):
            return "a header name is not valid UTF-8"
        if name.lower() != redact and not is_utf8(value):
            return f"header {name} is not valid UTF-8"
    if not is_utf8(request.raw_path):
        return "the path or query string is not valid UTF-8"
    if not all(is_utf8(name) and is_utf8(value) for name, value in request.query.items()):
        return "the query string is not valid UTF-8 once decoded"
    return "the request is not valid UTF-8"


def build_event(
    request: AnyRequest, body: bytes, port: int | None, route: Route, redact: str | None = None
) -> dict[str, Any]:
    """The HTTP API payload 2.0 event for `request` on `route` (a Function URL's event, with the
    route in `routeKey` and `pathParameters`), without header `redact`.

    The checked credential stays out of the event, so records and replays never hold it.
    """
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in request.headers.items():
        key = name.lower()
        if key == redact:
            continue
        if key == "cookie":
            cookies.extend(c for c in (part.strip() for part in value.split(";")) if c)
        else:
            headers[key] = f"{headers[key]},{value}" if key in headers else value
    remote = request.remote or ""
    headers.setdefault("x-forwarded-for", remote)  # a proxy in front keeps its own
    headers.setdefault("x-forwarded-proto", request.scheme)
    if port is not None:
        headers.setdefault("x-forwarded-port", str(port))
    raw_path, _, raw_query = request.raw_path.partition("?")
    domain = _domain(headers.get("host", ""))
    now = time.time()
    version = request.version
    context = {
        "accountId": "000000000000",
        "apiId": "lambdaemon",
        "domainName": domain,
        "domainPrefix": domain.split(".", 1)[0],
        "http": {
            # _method(), inline on the hot path
            "method": request.method if route.method == "ANY" else route.method,
            "path": raw_path,
            "protocol": f"HTTP/{version.major}.{version.minor}",
            "sourceIp": remote,
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": new_id(),
        "routeKey": route.route_key,
        "stage": "$default",
        "time": _request_time(int(now)),
        "timeEpoch": int(now * 1000),  # a JSON number: Go's int64
    }
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route.route_key,
        "rawPath": raw_path,
        "rawQueryString": raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if raw_query:
        params: dict[str, str] = {}
        for name, value in request.query.items():
            params[name] = f"{params[name]},{value}" if name in params else value
        event["queryStringParameters"] = params
    if route.param is not None:
        event["pathParameters"] = {route.param: request.path[len(route.prefix) :]}
    event["requestContext"] = context
    text = _as_text(request.content_type, body) if body else None
    if body:
        event["body"] = text if text is not None else b2a_base64(body, newline=False).decode()
    event["isBase64Encoded"] = bool(body) and text is None
    return event


def build_v1_event(
    request: AnyRequest, body: bytes, port: int | None, route: Route, redact: str | None = None
) -> dict[str, Any]:
    """The API Gateway REST proxy event (payload 1.0) for `request` on `route`, without header
    `redact`: header names as the client wrote them, each with its last value in `headers` and
    all of them in `multiValueHeaders`, and `null` for what is empty, as API Gateway sends."""
    headers: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        if name.lower() == redact:
            continue
        headers[name] = value
        multi.setdefault(name, []).append(value)
    remote = request.remote or ""
    forwarded = {"X-Forwarded-For": remote, "X-Forwarded-Proto": request.scheme}
    if port is not None:
        forwarded["X-Forwarded-Port"] = str(port)
    for name, value in forwarded.items():
        if name not in request.headers:  # a proxy in front keeps its own
            headers[name], multi[name] = value, [value]
    query: dict[str, str] = {}
    multi_query: dict[str, list[str]] = {}
    for name, value in request.query.items():
        query[name] = value  # the last one, as API Gateway keeps
        multi_query.setdefault(name, []).append(value)
    raw_path = request.raw_path.partition("?")[0]
    domain = _domain(request.headers.get("Host", ""))
    method = _method(request, route)
    now = time.time()
    version = request.version
    request_id = new_id()
    user_agent = request.headers.get("User-Agent", "")
    identity: dict[str, str | None] = dict.fromkeys(_IDENTITY_NULLS)
    identity.update(sourceIp=remote, userAgent=user_agent)
    text = _as_text(request.content_type, body) if body else None
    return {
        "version": "1.0",
        "resource": route.resource,
        "path": raw_path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": multi,
        "queryStringParameters": query or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": (
            {route.param: request.path[len(route.prefix) :]} if route.param is not None else None
        ),
        "stageVariables": None,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "lambdaemon",
            "resourceId": route.trigger_id,
            "resourcePath": route.resource,
            "httpMethod": method,
            "path": raw_path,  # the stage is $default: no prefix, as HTTP APIs send
            "stage": "$default",
            "protocol": f"HTTP/{version.major}.{version.minor}",
            "requestId": request_id,
            "extendedRequestId": request_id,
            "requestTime": _request_time(int(now)),
            "requestTimeEpoch": int(now * 1000),
            "domainName": domain,
            "domainPrefix": domain.split(".", 1)[0],
            "identity": identity,
        },
        "body": (text if text is not None else b2a_base64(body, newline=False).decode())
        if body
        else None,
        "isBase64Encoded": bool(body) and text is None,
    }


_IDENTITY_NULLS = (
    "accessKey",
    "accountId",
    "apiKey",
    "apiKeyId",
    "caller",
    "cognitoAuthenticationProvider",
    "cognitoAuthenticationType",
    "cognitoIdentityId",
    "cognitoIdentityPoolId",
    "principalOrgId",
    "user",
    "userArn",
)


def _method(request: AnyRequest, route: Route) -> str:
    """The method the event names: the request's, but GET for a HEAD that a GET route serves,
    so the handler answers as for GET (the listener sends the head without the body)."""
    return request.method if route.method == "ANY" else route.method


def _domain(host: str) -> str:
    return host.rpartition(":")[0] if host.rfind(":") > host.rfind("]") else host


def _request_time(second: int) -> str:
    """requestContext.time (CLF, as Function URLs write it), formatted once a second."""
    if _clf_second[0] != second:
        t = time.gmtime(second)
        _clf_second[:] = [
            second,
            f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000",
        ]
    return _clf_second[1]  # type: ignore[no-any-return]


_clf_second: list[Any] = [-1, ""]


def _as_text(content_type: str, body: bytes) -> str | None:
    if not TEXT_TYPES.fullmatch(content_type):
        return None
    try:
        return body.decode()
    except UnicodeDecodeError:
        return None  # labelled text but is not UTF-8: base64 keeps it intact


def to_response(invocation_id: str, outcome: Outcome, v1: bool = False) -> web.Response:
    """A sync invocation's outcome as the HTTP response, by Function URL rules (see module doc),
    or with `v1` by API Gateway REST's: only a result with `statusCode` is a response."""
    request_id = {"x-amzn-RequestId": invocation_id}
    failed = "Internal server error" if v1 else "Internal Server Error"  # as each API says it
    if outcome.status is Status.TIMED_OUT:
        return _message(504, "Endpoint request timed out", request_id)
    if outcome.status is not Status.SUCCEEDED:
        return _message(502, failed, request_id)  # the error stays in the record
    try:
        if json_too_deep(outcome.payload):  # the daemon's own stack is at stake here
            raise ValueError(f"the result is nested deeper than {MAX_JSON_DEPTH} levels")
        result = _decode(outcome.payload)
        if isinstance(result, dict) and "statusCode" in result:
            return _structured(result, invocation_id, v1)
        if v1:
            raise ValueError("a payload 1.0 result must be an object with statusCode")
    except (ValueError, TypeError) as exc:  # msgspec.DecodeError is a ValueError
        # As API Gateway answers a malformed proxy response; the reason is for the operator.
        log.warning("webhook_bad_response", invocation_id=invocation_id, error=str(exc)[:200])
        return _message(502, failed, request_id)
    return web.Response(
        status=200, body=outcome.payload, content_type="application/json", headers=request_id
    )


def _structured(result: dict[str, Any], invocation_id: str, v1: bool = False) -> web.Response:
    status = result["statusCode"]
    if type(status) is not int or not 200 <= status <= 599:  # a 1xx cannot end a response
        raise ValueError(f"statusCode {status!r} is not a final HTTP status")
    given, multi = result.get("headers") or {}, result.get("multiValueHeaders") or {}
    cookies = result.get("cookies") or []
    if not isinstance(given, dict) or not isinstance(multi, dict) or not isinstance(cookies, list):
        raise TypeError("headers and multiValueHeaders must be objects and cookies a list")
    headers: CIMultiDict[str] = CIMultiDict()
    for name, values in multi.items():  # API Gateway's REST shape: each name with a list
        if not isinstance(values, list):
            raise TypeError(f"multiValueHeaders[{name!r}] is not a list")
        for value in values:
            _add_header(headers, name, value)
    for name, value in given.items():  # merged with those, a pair given in both only once
        if v1 and name in headers:
            continue  # REST: a name in multiValueHeaders takes only those values
        if _scalar(value) not in headers.getall(name, ()):
            _add_header(headers, name, value)
    for cookie in [] if v1 else cookies:  # payload 1.0 has no cookies: Set-Cookie headers do
        _add_header(headers, "Set-Cookie", cookie)
    body = result.get("body")
    if body is None or status in _NO_BODY:
        data = b""  # dropped after a 204/304 head, as aiohttp does: nothing frames it
    elif isinstance(body, str):
        binary = result.get("isBase64Encoded") is True
        data = base64.b64decode(body, validate=True) if binary else body.encode()
    else:
        data = _encode(body)  # lenient: a non-string body goes out as its JSON
    if status not in _NO_BODY:
        headers.setdefault("Content-Type", "application/json")
    headers["x-amzn-RequestId"] = invocation_id
    return web.Response(status=status, body=data, headers=headers)


def _add_header(headers: CIMultiDict[str], name: Any, value: Any) -> None:
    """Add a header from a handler's response, or raise ValueError if it is not one."""
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r:.100} is not an HTTP token")
    text = _scalar(value)
    if not _FIELD_VALUE.fullmatch(text):
        raise ValueError(f"header {name}: {text!r:.100} holds a control character")
    if name.lower() not in _NOT_FORWARDED:
        headers.add(name, text)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise TypeError(f"header value {value!r:.100} is not a string")


def _message(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=_encode({"message": message}),
        content_type="application/json",
        headers=headers,
    )
