"""Webhooks: every webhook trigger as a route on the shared public listener (`webhooks.listen`).

A request is matched on its exact path, then its method, held to `max_body_bytes`, checked by
its route's auth and turned into a Lambda Function URL event (payload v2.0). `mode = "sync"`
runs the function now and maps its result to the response by Lambda's rules; `mode = "async"`
answers 202 only once the event is committed.

Auth (a failure is 401, counted in `rejected` and logged without any secret):
- token: `Authorization: Bearer <token>`; with another `header`, that header holds the bare token.
- basic: `Authorization: Basic base64(username:password)`.
- hmac: `<header>: sha256=<hex>`, HMAC-SHA256 of the raw body under the secret (GitHub). With a
  `timestamp_header`, that header holds Unix seconds that must lie within `replay_window_s` of
  now, and the MAC covers `v0:<timestamp>:<raw body>` (Slack's base string; a `v0=<hex>`
  signature is accepted too, so Slack works as is). Digests are compared in constant time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
from binascii import b2a_base64
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import structlog
from aiohttp import web
from msgspec import Meta
from multidict import CIMultiDict

from daemon.credentials import read_secret
from daemon.errors import (
    ConfigError,
    QueueFullError,
    ShuttingDownError,
    StoreUnavailableError,
    UnknownFunctionError,
)
from daemon.http.api import start_site
from daemon.http.wire import AnyRequest, Handler, WireRequest
from daemon.models import Outcome, Status, new_id
from triggers.base import Emit, Inputs, Placed, TriggerSettings, trigger_key

if TYPE_CHECKING:
    from daemon.config import Config

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
_SIGNATURE = re.compile(r"(?:sha256|v0)=([0-9a-fA-F]{64})")
_STAMP = re.compile(r"[0-9]{1,12}")  # Unix seconds; the bound keeps int() cheap and safe
_UNSAFE_HEADER = re.compile(r"[\r\n\0]")
_NOT_FORWARDED = frozenset({"content-length", "transfer-encoding", "connection"})
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode


class _Auth(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"
):
    pass


class NoAuth(_Auth, tag="none", frozen=True):
    pass


class TokenAuth(_Auth, tag="token", frozen=True):
    token_file: str
    header: str = "Authorization"


class BasicAuth(_Auth, tag="basic", frozen=True):
    username: str
    password_file: str


class HmacAuth(_Auth, tag="hmac", frozen=True):
    secret_file: str
    header: str = "X-Hub-Signature-256"
    timestamp_header: str | None = None
    replay_window_s: Annotated[float, Meta(gt=0)] = 300.0


AuthConfig = NoAuth | TokenAuth | BasicAuth | HmacAuth


class WebhookTriggerConfig(TriggerSettings, tag="webhook", frozen=True):
    path: Annotated[str, Meta(pattern=r"^/")]
    methods: list[str] = msgspec.field(default_factory=lambda: ["POST"])
    mode: Literal["sync", "async"] = "sync"
    auth: AuthConfig = NoAuth()

    def check(self, config: Config, key: str) -> None:
        if config.webhooks is None:
            raise ConfigError(config.path, key, "a webhook trigger needs a [webhooks] section")
        for method in self.methods:
            if not re.match(r"^[A-Z]+$", method):
                raise ConfigError(
                    config.path, f"{key}.methods", f"{method!r} is not an HTTP method"
                )

    def secret_files(self) -> dict[str, str]:
        if type(self.auth) not in CHECKS:
            return {}  # auth "none"
        field = CHECKS[type(self.auth)][1]
        return {f"auth.{field}": getattr(self.auth, field)}

    @classmethod
    def check_all(cls, config: Config, triggers: Sequence[Placed]) -> None:
        seen: dict[tuple[str, str], str] = {}  # no two triggers answer the same path and method
        for _, trigger_id, trigger in triggers:
            key = trigger_key(trigger_id)
            for method in trigger.methods:
                other = seen.setdefault((trigger.path, method), key)
                if other != key:
                    reason = f"{method} {trigger.path} is already routed by {other}"
                    raise ConfigError(config.path, f"{key}.path", reason)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # aiohttp keeps undecodable header bytes so


class NoCheck:
    needs_body = False
    challenge: dict[str, str] = {}
    redact: str | None = None  # the header holding the credential: kept out of the event

    def check(self, headers: Mapping[str, str], body: bytes) -> str | None:
        return None


class TokenCheck:
    needs_body = False

    def __init__(self, auth: TokenAuth, secret: str) -> None:
        self.header, self.bearer = auth.header, auth.header.lower() == "authorization"
        self.redact = auth.header.lower()
        self.expected = _utf8(secret)
        self.challenge = {"WWW-Authenticate": 'Bearer realm="lambdaemon"'} if self.bearer else {}

    def check(self, headers: Mapping[str, str], body: bytes) -> str | None:
        value = headers.get(self.header)
        if value is None:
            return "auth_missing"
        if self.bearer:
            scheme, _, value = value.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return "auth_malformed"
        return None if hmac.compare_digest(_utf8(value.strip()), self.expected) else "auth_invalid"


class BasicCheck:
    needs_body, redact = False, "authorization"
    challenge = {"WWW-Authenticate": 'Basic realm="lambdaemon", charset="UTF-8"'}

    def __init__(self, auth: BasicAuth, secret: str) -> None:
        self.username, self.password = _utf8(auth.username), _utf8(secret)

    def check(self, headers: Mapping[str, str], body: bytes) -> str | None:
        value = headers.get("Authorization")
        if value is None:
            return "auth_missing"
        scheme, _, encoded = value.partition(" ")
        try:
            if scheme.lower() != "basic":
                raise ValueError(scheme)
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except ValueError:  # binascii.Error too
            return "auth_malformed"
        username, colon, password = decoded.partition(b":")
        # Both halves compared, always: which one was wrong must not show in the timing.
        good = hmac.compare_digest(username, self.username)
        good &= hmac.compare_digest(password, self.password)
        return None if colon and good else "auth_invalid"


class HmacCheck:
    needs_body, redact = True, None  # a signature is no secret; handlers may check it again
    challenge: dict[str, str] = {}

    def __init__(self, auth: HmacAuth, secret: str) -> None:
        self.header, self.timestamp_header = auth.header, auth.timestamp_header
        self.window_s, self.key = auth.replay_window_s, _utf8(secret)

    def check(self, headers: Mapping[str, str], body: bytes) -> str | None:
        signature = headers.get(self.header)
        stamp = headers.get(self.timestamp_header) if self.timestamp_header else ""
        if signature is None or stamp is None:
            return "auth_missing"
        match = _SIGNATURE.fullmatch(signature.strip())
        if match is None or (self.timestamp_header and not _STAMP.fullmatch(stamp)):
            return "auth_malformed"
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        if self.timestamp_header:
            if abs(time.time() - int(stamp)) > self.window_s:
                return "auth_stale"
            mac.update(f"v0:{stamp}:".encode())
        mac.update(body)  # in two steps: no copy of a large body
        return None if hmac.compare_digest(mac.hexdigest(), match[1].lower()) else "auth_invalid"


# auth config type -> (check class, the field naming its secret)
CHECKS: dict[type, tuple[type, str]] = {
    TokenAuth: (TokenCheck, "token_file"),
    BasicAuth: (BasicCheck, "password_file"),
    HmacAuth: (HmacCheck, "secret_file"),
}


class Route(msgspec.Struct, frozen=True):
    function: str
    trigger_id: str
    path: str
    mode: str
    check: Any  # one of the *Check classes above


class WebhookSource:
    """All webhook triggers, served by one aiohttp app on `webhooks.listen`.

    `rejected` counts refused requests by reason (`auth_missing`, `auth_malformed`,
    `auth_invalid`, `auth_stale`, `not_found`, `method_not_allowed`, `too_large`,
    `queue_full`, `store_unavailable`, `draining`, `reloading`); `accepted` counts dispatched
    ones. A reload swaps routes and limits in place (`update`); only a new `listen` rebinds.
    """

    name = "webhook"
    settings = WebhookTriggerConfig

    def __init__(
        self, config: Config, store: Any, triggers: list[tuple[str, str, WebhookTriggerConfig]]
    ) -> None:
        settings = config.webhooks
        assert settings is not None  # config validation requires it with any webhook trigger
        self.listen, self.max_body_bytes = settings.listen, settings.max_body_bytes
        self.drain_s = config.daemon.shutdown_timeout_s
        self.routes: dict[str, dict[str, Route]] = {}
        for function, trigger_id, trigger in triggers:
            check = _build_check(config, trigger.auth, f"{trigger_key(trigger_id)}.auth")
            by_method = self.routes.setdefault(trigger.path, {})
            for method in trigger.methods:  # config validation refuses duplicate routes
                by_method[method] = Route(function, trigger_id, trigger.path, trigger.mode, check)
        self._allow = {path: ", ".join(sorted(methods)) for path, methods in self.routes.items()}
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self.port: int | None = None  # the bound port once listening (`listen` may say 0)
        self.listening = asyncio.Event()
        self.started = self.listening  # what the daemon waits for before it reports ready
        self._emit: Emit | None = None
        self._draining = False

    @staticmethod
    def inputs(config: Config, triggers: list[Placed], secrets: Mapping[str, str]) -> Inputs:
        # Routes, limits and secrets change in place; only a new address needs a new socket.
        assert config.webhooks is not None
        keys = tuple(f"{trigger_key(trigger_id)}." for _, trigger_id, _ in triggers)
        auth = sorted((k, v) for k, v in secrets.items() if k.startswith(keys))
        live = (triggers, config.webhooks, config.daemon.shutdown_timeout_s, auth)
        return Inputs(restart=config.webhooks.listen, update=live)

    @property
    def auth_failures(self) -> int:
        return sum(n for reason, n in self.rejected.items() if reason.startswith("auth_"))

    async def run(self, emit: Emit) -> None:
        self._emit, self._draining = emit, False
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)  # our own table decides 404/405
        runner = await start_site(
            app,
            self.listen,
            "webhooks.listen",
            drain_s=self.drain_s,
            router=self._route,
            max_body_bytes=self.max_body_bytes,
        )
        try:
            self.port = runner.addresses[0][1]
            log.info(
                "webhook_listening", listen=self.listen, port=self.port, routes=sorted(self.routes)
            )
            self.listening.set()
            await asyncio.get_running_loop().create_future()  # serve until cancelled
        finally:
            self._draining = True  # requests that still slip in get 503 while in-flight ones finish
            self.listening.clear()
            await self._stop(runner)

    def update(self, new: WebhookSource) -> None:
        """Serve `new`'s routes and limits from now on, on this same listener (same `listen`).

        A request already routed finishes under the route it matched.
        """
        self.routes, self._allow = new.routes, new._allow
        self.max_body_bytes, self.drain_s = new.max_body_bytes, new.drain_s
        log.info(
            "webhook_routes_updated", routes=sorted(self.routes), max_body_bytes=self.max_body_bytes
        )

    async def _stop(self, runner: web.AppRunner) -> None:
        for site in list(runner.sites):
            await site.stop()  # no new connections from here on
        log.info("webhook_draining", drain_s=self.drain_s)
        await runner.cleanup()  # in-flight requests get up to drain_s to finish
        log.info("webhook_stopped", accepted=self.accepted, rejected=dict(self.rejected))

    def _route(self, request: WireRequest) -> Handler | None:
        # Everything the fast path can frame (daemon/http/wire.py); a body over today's limit goes
        # to aiohttp, which streams it to _handle to be refused without buffering it.
        return self._handle if (request.content_length or 0) <= self.max_body_bytes else None

    async def _handle(self, request: AnyRequest) -> web.StreamResponse:
        by_method = self.routes.get(request.path)
        if by_method is None:
            return self._reject(request, None, "not_found", 404, "Not Found")
        route = by_method.get(request.method)
        if route is None:
            allow = {"Allow": self._allow[request.path]}
            return self._reject(
                request, None, "method_not_allowed", 405, "Method Not Allowed", allow
            )
        if self._draining:
            busy = {"Retry-After": "5", "Connection": "close"}
            return self._reject(request, route, "draining", 503, "Service Unavailable", busy)
        check = route.check
        # Header-only checks run before the body is read: strangers cannot make us buffer it.
        if not check.needs_body and (reason := check.check(request.headers, b"")):
            return self._reject(request, route, reason, 401, "Unauthorized", check.challenge)
        body = await self._read_body(request)
        if body is None:
            return self._reject(request, route, "too_large", 413, "Request Entity Too Large")
        if check.needs_body and (reason := check.check(request.headers, body)):
            return self._reject(request, route, reason, 401, "Unauthorized", check.challenge)
        event = _encode(build_event(request, body, self.port, check.redact))
        if route.mode == "async":
            return await self._accept(request, route, event)
        return await self._invoke(request, route, event)

    async def _read_body(self, request: AnyRequest) -> bytes | None:
        limit = self.max_body_bytes  # read per request: a reload may change it in place
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
        assert self._emit is not None
        delivery = next((d for h in DELIVERY_HEADERS if (d := request.headers.get(h))), None)
        if delivery is not None and len(delivery) > 128:  # the key is stored: bound its size
            delivery = hashlib.sha256(_utf8(delivery)).hexdigest()
        try:
            accepted = await self._emit(
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
        self.accepted += 1
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
        assert self._emit is not None
        try:
            invocation_id, outcome = await self._emit.invoke_sync(
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
        self.accepted += 1
        response = to_response(invocation_id, outcome)
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
        self.rejected[reason] += 1
        emit_log = log.warning if reason.startswith("auth_") else log.info
        where = route.path if route else request.path[:200]
        emit_log(
            "webhook_rejected",
            reason=reason,
            route=where,
            remote=request.remote,
            status=status,
            count=self.rejected[reason],
        )
        return _message(status, message, headers)


def _build_check(config: Config, auth: Any, key: str) -> Any:
    if type(auth) not in CHECKS:
        return NoCheck()  # auth "none"
    cls, field = CHECKS[type(auth)]
    # Read once, here: no file access on the request path.
    return cls(auth, read_secret(config, getattr(auth, field), f"{key}.{field}"))


def build_event(
    request: AnyRequest, body: bytes, port: int | None, redact: str | None = None
) -> dict[str, Any]:
    """The Lambda Function URL (payload v2.0) event for `request`, without header `redact`.

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
    host = headers.get("host", "")
    domain = host.rpartition(":")[0] if host.rfind(":") > host.rfind("]") else host
    now = time.time()
    version = request.version
    context = {
        "accountId": "000000000000",
        "apiId": "lambdaemon",
        "domainName": domain,
        "domainPrefix": domain.split(".", 1)[0],
        "http": {
            "method": request.method,
            "path": raw_path,
            "protocol": f"HTTP/{version.major}.{version.minor}",
            "sourceIp": remote,
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": new_id(),
        "routeKey": "$default",
        "stage": "$default",
        "time": _request_time(int(now)),
        "timeEpoch": int(now * 1000),  # a JSON number: Go's int64
    }
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
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
    event["requestContext"] = context
    text = _as_text(request.content_type, body) if body else None
    if body:
        event["body"] = text if text is not None else b2a_base64(body, newline=False).decode()
    event["isBase64Encoded"] = bool(body) and text is None
    return event


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


def to_response(invocation_id: str, outcome: Outcome) -> web.Response:
    """A sync invocation's outcome as the HTTP response, by Function URL rules (see module doc)."""
    request_id = {"x-amzn-RequestId": invocation_id}
    if outcome.status is Status.TIMED_OUT:
        return _message(504, "Endpoint request timed out", request_id)
    if outcome.status is not Status.SUCCEEDED:
        return _message(502, "Internal Server Error", request_id)  # the error stays in the record
    try:
        result = _decode(outcome.payload)
        if isinstance(result, dict) and "statusCode" in result:
            return _structured(result, invocation_id)
    except (ValueError, TypeError) as exc:  # msgspec.DecodeError is a ValueError
        log.warning("webhook_bad_response", invocation_id=invocation_id, error=str(exc)[:200])
        return _message(502, "Internal Server Error", request_id)
    return web.Response(
        status=200, body=outcome.payload, content_type="application/json", headers=request_id
    )


def _structured(result: dict[str, Any], invocation_id: str) -> web.Response:
    status = result["statusCode"]
    if type(status) is not int or not 200 <= status <= 599:  # a 1xx cannot end a response
        raise ValueError(f"statusCode {status!r} is not a final HTTP status")
    given, cookies = result.get("headers") or {}, result.get("cookies") or []
    if not isinstance(given, dict) or not isinstance(cookies, list):
        raise TypeError("headers must be an object and cookies a list")
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in given.items():
        if name.lower() not in _NOT_FORWARDED:
            headers.add(_safe(name), _safe(_scalar(value)))
    for cookie in cookies:
        headers.add("Set-Cookie", _safe(cookie))
    headers.setdefault("Content-Type", "application/json")
    headers["x-amzn-RequestId"] = invocation_id
    body = result.get("body")
    if body is None:
        data = b""
    elif isinstance(body, str):
        binary = result.get("isBase64Encoded") is True
        data = base64.b64decode(body, validate=True) if binary else body.encode()
    else:
        data = _encode(body)  # lenient: a non-string body goes out as its JSON
    return web.Response(status=status, body=data, headers=headers)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise TypeError(f"header value {value!r} is not a string")


def _safe(text: Any) -> str:
    if not isinstance(text, str) or _UNSAFE_HEADER.search(text):
        raise ValueError(f"{text!r} cannot go into an HTTP header")
    return text


def _message(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=_encode({"message": message}),
        content_type="application/json",
        headers=headers,
    )
