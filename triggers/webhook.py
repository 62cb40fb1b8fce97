"""Webhooks: every webhook trigger as a route on the shared public listener (`webhooks.listen`).

This module is the kind: its settings and their auth, the checks each auth makes, the route
table (path -> method -> route) and the source's lifecycle. Serving the routes over HTTP (the
request, its Function URL event, the response) is daemon/http/webhooks.py, which the source
imports only when it runs: loading a config never imports aiohttp or the daemon's HTTP stack.

Auth (a failure is 401, counted in `rejected` and logged without any secret):
- token: `Authorization: Bearer <token>`; with another `header`, that header holds the bare token.
- basic: `Authorization: Basic base64(username:password)`.
- hmac: `<header>: sha256=<hex>`, HMAC-SHA256 of the raw body under the secret (GitHub). With a
  `timestamp_header`, that header holds Unix seconds that must lie within `replay_window_s` of
  now, and the MAC covers `v0:<timestamp>:<raw body>` (Slack's base string; a `v0=<hex>`
  signature is accepted too, so Slack works as is). Digests are compared in constant time.
  A signature accepted within that window is remembered until the window ends: the same signed
  request sent again is refused with 409 (`auth_replayed`), see ReplayGuard.

Routes (RouteTable): a `path` is exact (`/hooks/github`) or greedy (`/api/{proxy+}`, API
Gateway's syntax, or its shorthand `/api/*`). Greedy matches only below its parent, with a
non-empty rest, as API Gateway's `{proxy+}` does: `/api/x`, `/api/x/` and `/api/x/y`, never
`/api` or `/api/`. The most specific route wins: an exact path, then the greedy route with the
longest prefix; at one path an explicit method wins over `ANY`, and `HEAD` falls back on `GET`.
An exact path costs one dict lookup; greedy prefixes are tried, longest first, only after it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import structlog
from msgspec import Meta

from daemon.credentials import read_secret
from daemon.errors import ConfigError
from daemon.metrics import Sample
from triggers.base import Emit, Inputs, Placed, TriggerSettings, trigger_key

if TYPE_CHECKING:
    from daemon.config import Config

log = structlog.get_logger("lambdaemon.webhook")

# The methods a route may name (API Gateway's set); ANY stands for every method.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ANY = "ANY"
_GREEDY = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\+\}")  # {proxy+}: the rest of the path
_SIGNATURE = re.compile(r"(?:sha256|v0)=([0-9a-fA-F]{64})")
_STAMP = re.compile(r"[0-9]{1,12}")  # Unix seconds; the bound keeps int() cheap and safe
REPLAY_MAX_ENTRIES = 20_000  # ~4 MB; past it the oldest signatures are forgotten first


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


class CorsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A Function URL's `Cors` settings, per route (snake_case names of the same fields)."""

    allow_origins: Annotated[list[str], Meta(min_length=1)]
    allow_methods: list[str] = msgspec.field(default_factory=lambda: ["*"])
    allow_headers: list[str] = msgspec.field(default_factory=list)
    expose_headers: list[str] = msgspec.field(default_factory=list)
    max_age: Annotated[int, Meta(ge=0, le=86400)] = 0
    allow_credentials: bool = False


class WebhookTriggerConfig(TriggerSettings, tag="webhook", frozen=True):
    path: Annotated[str, Meta(pattern=r"^/")]
    methods: list[str] = msgspec.field(default_factory=lambda: [ANY])
    mode: Literal["sync", "async"] = "sync"
    payload_format: Literal["1.0", "2.0"] = "2.0"
    auth: AuthConfig = NoAuth()
    cors: CorsConfig | None = None

    def check(self, config: Config, key: str) -> None:
        if config.webhooks is None:
            raise ConfigError(config.path, key, "a webhook trigger needs a [webhooks] section")
        try:
            parse_path(self.path)
        except ValueError as exc:
            raise ConfigError(config.path, f"{key}.path", str(exc)) from None
        if not self.methods:
            raise ConfigError(config.path, f"{key}.methods", "names no method (ANY: every one)")
        for method in self.methods:
            if method != ANY and method not in METHODS:
                known = ", ".join(sorted(METHODS | {ANY}))
                reason = f"{method!r} is not an HTTP method a route can take ({known})"
                raise ConfigError(config.path, f"{key}.methods", reason)
        if self.cors is not None:
            for method in self.cors.allow_methods:
                if method != "*" and method not in METHODS:
                    reason = f"{method!r} is not an HTTP method (or *)"
                    raise ConfigError(config.path, f"{key}.cors.allow_methods", reason)

    def secret_files(self) -> dict[str, str]:
        if type(self.auth) not in CHECKS:
            return {}  # auth "none"
        field = CHECKS[type(self.auth)][1]
        return {f"auth.{field}": getattr(self.auth, field)}

    @classmethod
    def check_all(cls, config: Config, triggers: Sequence[Placed]) -> None:
        # No two triggers answer the same route and method: `/a/*`, `/a/{proxy+}` and
        # `/a/{rest+}` are one route (a greedy parameter's name does not change what it matches).
        seen: dict[tuple[str, str], str] = {}
        for _, trigger_id, trigger in triggers:
            key = trigger_key(trigger_id)
            resource, param = parse_path(trigger.path)  # check() has refused a bad one
            route = resource.rpartition("/")[0] + "/{+}" if param else resource
            for method in trigger.methods:
                other = seen.setdefault((route, method), key)
                if other != key:
                    reason = f"{method} {resource} is already routed by {other}"
                    raise ConfigError(config.path, f"{key}.path", reason)


def parse_path(path: str) -> tuple[str, str | None]:
    """`path` as API Gateway names the resource, and its greedy parameter's name (None for an
    exact path); ValueError saying what is wrong with a pattern this daemon cannot match.

    `/api/*` is `/api/{proxy+}`. Only a final greedy segment is a pattern: anything else with a
    brace or a star would be matched literally, which is never what was meant.
    """
    head, _, last = path.rpartition("/")
    if last == "*":
        last = "{proxy+}"
    greedy = _GREEDY.fullmatch(last)
    if any(char in head for char in "{}*"):
        raise ValueError(
            f"{path!r}: a greedy {{proxy+}} or * must be the last segment, and no other part"
            " of a path is a pattern"
        )
    if greedy is None and any(char in last for char in "{}*"):
        raise ValueError(
            f"{path!r}: {last!r} is not a segment a route can match; a greedy route ends in"
            " /{proxy+} or /*"
        )
    return f"{head}/{last}", greedy[1] if greedy else None


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # aiohttp keeps undecodable header bytes so


class NoCheck:
    needs_body = False
    challenge: dict[str, str] = {}
    redact: str | None = None  # the header holding the credential: kept out of the event

    def check(self, headers: Mapping[str, str], body: bytes) -> str | None:
        return None

    def forget(self, headers: Mapping[str, str]) -> None:
        """The request that passed check() was not taken (refused, or the queue was full): a
        check that remembers requests lets the same one through again."""


class ReplayGuard:
    """The signatures accepted by time-stamped HMAC routes, each kept until its replay window
    ends, so that a captured request cannot be sent again within the window.

    Bounded by `max_entries`: once full, the oldest signature is forgotten for each new one
    (counted in `evicted`, logged). New requests are never refused for want of room; only an
    evicted signature could be replayed, and only until its own window ends. The memory is the
    process's: a restart forgets it.
    """

    def __init__(self, max_entries: int = REPLAY_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.evicted = 0
        self._until: OrderedDict[str, float] = OrderedDict()  # signature -> Unix s, by arrival

    def claim(self, signature: str, until_s: float) -> bool:
        """Remember `signature` until `until_s`; False if it is remembered already."""
        seen = self._until
        now = time.time()
        # Arrival order is nearly expiry order; one that outlives its window here is stale by
        # its timestamp anyway, so it only takes room until those before it have gone.
        while seen and next(iter(seen.values())) < now:
            seen.popitem(last=False)
        if signature in seen:
            return False
        seen[signature] = until_s
        if len(seen) > self.max_entries:
            seen.popitem(last=False)
            self.evicted += 1
            if self.evicted % 1000 == 1:
                log.warning("webhook_replay_memory_full", entries=len(seen), evicted=self.evicted)
        return True

    def release(self, signature: str) -> None:
        self._until.pop(signature, None)

    def adopt(self, old: ReplayGuard) -> None:
        """Take over what `old` remembers (a reload builds new routes; replays stay refused)."""
        self._until, self.evicted = old._until, old.evicted

    def __len__(self) -> int:
        return len(self._until)


class TokenCheck(NoCheck):
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


class BasicCheck(NoCheck):
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


class HmacCheck(NoCheck):
    needs_body, redact = True, None  # a signature is no secret; handlers may check it again

    def __init__(self, auth: HmacAuth, secret: str, replays: ReplayGuard | None = None) -> None:
        self.header, self.timestamp_header = auth.header, auth.timestamp_header
        self.window_s, self.key = auth.replay_window_s, _utf8(secret)
        # Without a timestamp a signature never expires: nothing bounded could remember it.
        self.replays = replays if self.timestamp_header else None

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
        signature = match[1].lower()
        if not hmac.compare_digest(mac.hexdigest(), signature):
            return "auth_invalid"
        # Only a valid signature is remembered: strangers cannot fill the memory.
        if self.replays is not None and not self.replays.claim(
            signature, int(stamp) + self.window_s
        ):
            return "auth_replayed"
        return None

    def forget(self, headers: Mapping[str, str]) -> None:
        if self.replays is not None and (
            match := _SIGNATURE.fullmatch(headers[self.header].strip())
        ):
            self.replays.release(match[1].lower())


# auth config type -> (check class, the field naming its secret)
CHECKS: dict[type, tuple[type, str]] = {
    TokenAuth: (TokenCheck, "token_file"),
    BasicAuth: (BasicCheck, "password_file"),
    HmacAuth: (HmacCheck, "secret_file"),
}


class CorsPolicy:
    """A route's CORS answers, worked out once from its settings, as a Function URL gives them.

    An origin that is not allowed gets no CORS header at all (the browser then refuses). The
    origin is echoed, with `Vary: Origin`, when only some are allowed or credentials are, since a
    browser refuses `*` on a credentialed request.
    """

    def __init__(self, cors: CorsConfig) -> None:
        self.any_origin = "*" in cors.allow_origins
        self.origins = frozenset(origin.lower() for origin in cors.allow_origins)
        self.echo = not self.any_origin or cors.allow_credentials
        common: dict[str, str] = {}
        if cors.allow_credentials:
            common["Access-Control-Allow-Credentials"] = "true"
        self.on_response = dict(common)
        if cors.expose_headers:
            self.on_response["Access-Control-Expose-Headers"] = ", ".join(cors.expose_headers)
        self.on_preflight = dict(common)
        self.on_preflight["Access-Control-Allow-Methods"] = ", ".join(cors.allow_methods)
        if cors.allow_headers:
            self.on_preflight["Access-Control-Allow-Headers"] = ", ".join(cors.allow_headers)
        if cors.max_age:
            self.on_preflight["Access-Control-Max-Age"] = str(cors.max_age)

    def headers(self, origin: str | None, preflight: bool = False) -> dict[str, str] | None:
        """The CORS headers to send to `origin`, or None when it is not allowed (or absent)."""
        if origin is None or not (self.any_origin or origin.lower() in self.origins):
            return None
        headers = dict(self.on_preflight if preflight else self.on_response)
        if self.echo:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
        else:
            headers["Access-Control-Allow-Origin"] = "*"
        return headers


class Route(msgspec.Struct, frozen=True):
    function: str
    trigger_id: str
    path: str  # as configured
    mode: str
    check: Any  # one of the *Check classes above
    method: str = ANY  # the one it answers, or ANY
    resource: str = ""  # API Gateway's name of the path: /api/* is /api/{proxy+}
    param: str | None = None  # a greedy route's parameter name (proxy)
    prefix: str = ""  # what a path starts with to match: the exact path, or /api/ for /api/*
    route_key: str = ""  # "POST /api/{proxy+}", the event's routeKey
    v1: bool = False  # payload_format 1.0: API Gateway REST events and responses
    cors: CorsPolicy | None = None


class RouteTable:
    """path -> method -> Route, exact paths apart from greedy prefixes (module doc: which wins)."""

    def __init__(self, routes: list[Route]) -> None:
        self.exact: dict[str, dict[str, Route]] = {}
        greedy: dict[str, dict[str, Route]] = {}
        for route in routes:  # config validation refuses duplicate routes
            table = greedy if route.param else self.exact
            table.setdefault(route.prefix, {})[route.method] = route
        self.greedy = sorted(greedy.items(), key=lambda item: -len(item[0]))

    def find(self, path: str, method: str) -> Route | None:
        """The route that serves `method` on `path`, or None (`allow` then says 404 or 405)."""
        by_method = self.exact.get(path)
        if by_method is not None and (route := by_method.get(method)) is not None:
            return route  # the common case: one dict lookup and one more
        return self._find(path, method, by_method)

    def _find(self, path: str, method: str, by_method: dict[str, Route] | None) -> Route | None:
        if by_method is not None and (route := _for_method(by_method, method)) is not None:
            return route
        for prefix, by_method in self.greedy:
            if len(path) > len(prefix) and path.startswith(prefix):
                if (route := _for_method(by_method, method)) is not None:
                    return route
        return None

    def matching(self, path: str) -> list[dict[str, Route]]:
        """The method tables of every route `path` matches, most specific first."""
        found = [by_method] if (by_method := self.exact.get(path)) else []
        found += [
            by_method
            for prefix, by_method in self.greedy
            if len(path) > len(prefix) and path.startswith(prefix)
        ]
        return found

    def allow(self, path: str) -> str | None:
        """The `Allow` header of a 405 on `path`, or None when no route has the path (404)."""
        methods = {method for by_method in self.matching(path) for method in by_method}
        if not methods:
            return None
        if "GET" in methods:
            methods.add("HEAD")  # served by the GET route
        return ", ".join(sorted(methods))

    def names(self) -> list[str]:
        """Every route as `METHOD resource`, for the log."""
        tables = [*self.exact.values(), *(by_method for _, by_method in self.greedy)]
        return sorted(route.route_key for by_method in tables for route in by_method.values())


def _for_method(by_method: dict[str, Route], method: str) -> Route | None:
    """At one path: the method's own route, else ANY, else (for HEAD) the GET route."""
    route = by_method.get(method) or by_method.get(ANY)
    if route is None and method == "HEAD":
        route = by_method.get("GET")
    return route


def build_routes(
    config: Config, triggers: list[tuple[str, str, WebhookTriggerConfig]], replays: ReplayGuard
) -> RouteTable:
    """The route table of the webhook triggers; secrets are read here, once."""
    routes = []
    for function, trigger_id, trigger in triggers:
        key = f"{trigger_key(trigger_id)}.auth"
        check = _build_check(config, trigger.auth, key, replays)
        resource, param = parse_path(trigger.path)
        cors = CorsPolicy(trigger.cors) if trigger.cors is not None else None
        prefix = resource.rpartition("/")[0] + "/" if param else resource
        for method in trigger.methods:
            routes.append(
                Route(
                    function,
                    trigger_id,
                    trigger.path,
                    trigger.mode,
                    check,
                    method=method,
                    resource=resource,
                    param=param,
                    prefix=prefix,
                    route_key=f"{method} {resource}",
                    v1=trigger.payload_format == "1.0",
                    cors=cors,
                )
            )
    return RouteTable(routes)


class WebhookSource:
    """All webhook triggers, as one route table served on `webhooks.listen` (by
    daemon/http/webhooks.py's WebhookServer, while the source runs).

    `rejected` counts refused requests by reason (`auth_missing`, `auth_malformed`,
    `auth_invalid`, `auth_stale`, `auth_replayed`, `not_found`, `method_not_allowed`,
    `too_large`, `bad_request`, `queue_full`, `store_unavailable`, `draining`, `reloading`);
    `accepted` counts dispatched ones. A reload swaps routes and limits in place (`update`);
    only a new `listen` rebinds.
    """

    name = "webhook"
    settings = WebhookTriggerConfig

    def __init__(
        self, config: Config, store: Any, triggers: list[tuple[str, str, WebhookTriggerConfig]]
    ) -> None:
        settings = config.webhooks
        assert settings is not None  # config validation requires it with any webhook trigger
        self.listen, self.max_body_bytes = settings.listen, settings.max_body_bytes
        self.limits = settings  # timeouts and connection caps (daemon/http/wire.py reads them)
        self.drain_s = config.daemon.shutdown_timeout_s
        self.replays = ReplayGuard()  # one for all routes: a signature is refused on any of them
        self.routes = build_routes(config, triggers, self.replays)
        self.rejected: Counter[str] = Counter()
        self.auth_failed: Counter[str] = Counter()  # by route path, as configured
        self.accepted = 0
        self.port: int | None = None  # the bound port once listening (`listen` may say 0)
        self.listening = asyncio.Event()
        self.started = self.listening  # what the daemon waits for before it reports ready

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

    def samples(self) -> list[Sample]:
        failed = "lambdaemon_webhook_auth_failures_total"
        return [
            *(Sample(failed, {"route": path}, n) for path, n in self.auth_failed.items()),
            *(
                Sample("lambdaemon_webhook_rejected_total", {"reason": reason}, n)
                for reason, n in self.rejected.items()
            ),
        ]

    async def run(self, emit: Emit) -> None:
        # Imported here, not above: aiohttp and the HTTP stack load when the source serves, never
        # when a config that has webhook triggers is loaded (every CLI command loads it).
        from daemon.http.webhooks import WebhookServer

        server = WebhookServer(self, emit)
        self.port = await server.start()
        try:
            log.info(
                "webhook_listening", listen=self.listen, port=self.port, routes=self.routes.names()
            )
            self.listening.set()
            await asyncio.get_running_loop().create_future()  # serve until cancelled
        finally:
            self.listening.clear()
            await server.stop()  # requests that still slip in get 503 while in-flight ones finish
            log.info("webhook_stopped", accepted=self.accepted, rejected=dict(self.rejected))

    def update(self, new: WebhookSource) -> None:
        """Serve `new`'s routes and limits from now on, on this same listener (same `listen`).

        A request already routed finishes under the route it matched.
        """
        self.routes = new.routes
        new.replays.adopt(self.replays)  # the new routes' checks remember what these accepted
        self.replays = new.replays
        self.max_body_bytes, self.drain_s = new.max_body_bytes, new.drain_s
        self.limits = new.limits
        log.info(
            "webhook_routes_updated",
            routes=self.routes.names(),
            max_body_bytes=self.max_body_bytes,
        )


def _build_check(config: Config, auth: Any, key: str, replays: ReplayGuard) -> Any:
    if type(auth) not in CHECKS:
        return NoCheck()  # auth "none"
    cls, field = CHECKS[type(auth)]
    # Read once, here: no file access on the request path.
    secret = read_secret(config, getattr(auth, field), f"{key}.{field}")
    return HmacCheck(auth, secret, replays) if cls is HmacCheck else cls(auth, secret)
