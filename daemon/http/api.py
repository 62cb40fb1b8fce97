"""The admin listener: the Lambda Invoke API and health; the /v1/ endpoints are in admin.py."""

from __future__ import annotations

import base64
import functools
import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from aiohttp import web

from daemon import bubblewrap
from daemon.config import Config, FunctionConfig, ListenerSettings, listen_host
from daemon.credentials import read_secret
from daemon.dispatcher import Dispatcher
from daemon.errors import (
    ListenError,
    QueueFullError,
    ShuttingDownError,
    StoreUnavailableError,
    UnknownFunctionError,
)
from daemon.http.admin import DISPATCHER, STORE, add_admin_routes
from daemon.http.dashboard import DASHBOARD_TOKEN, add_dashboard_routes, is_public
from daemon.http.drain import add_drain_route
from daemon.http.follow import add_log_routes
from daemon.http.history import add_history_routes
from daemon.http.idempotency import SyncResultCache
from daemon.http.management import MAX_CODE_REQUEST, add_management_routes
from daemon.http.metrics import metrics
from daemon.http.session import carries_session, cookie_value, cross_site
from daemon.http.shapes import dumps, lambda_error, parse_function_name
from daemon.http.wire import (
    STATS,
    AnyRequest,
    FastRunner,
    FastSite,
    Handler,
    Router,
    WireRequest,
)
from daemon.logs import Throttle
from daemon.models import Outcome, Status
from daemon.pool.starts import StartHealth
from daemon.store.health import STORE_HEALTH
from daemon.store.sqlite import Store
from daemon.tail import invocation_text
from daemon.untrusted import MAX_JSON_DEPTH, is_utf8, json_too_deep
from daemon.versions import DeployError, invoked_arn

log = structlog.get_logger("lambdaemon.api")

MAX_SYNC_PAYLOAD = 6 * 1024 * 1024
MAX_ASYNC_PAYLOAD = 1024 * 1024
TAIL_BYTES = 4096
MAX_CLIENT_CONTEXT = 3583  # bytes of base64, Lambda's limit
_INVOKE_PATH = re.compile(r"/2015-03-31/functions/([^/]+)/invocations")
_CODE_PATH = re.compile(r"/2015-03-31/functions/[^/]+/code")
_json = msgspec.json.Encoder()

SYNC_RESULTS: web.AppKey[SyncResultCache] = web.AppKey("sync_results", SyncResultCache)
# What the API listener serves on daemon/http/wire.py's fast path (start_site's router).
FAST_ROUTES: web.AppKey[Router] = web.AppKey("fast_routes")
# The service's lifecycle for /health: a reason not to serve ("starting: ..."), or None.
LIFECYCLE: web.AppKey[Callable[[], str | None]] = web.AppKey("lifecycle")
# Whether the worker pool can start workers, for /health (daemon/pool/starts.py).
POOL_HEALTH: web.AppKey[StartHealth] = web.AppKey("pool_health", StartHealth)


def tail_log(invocation_id: str, fn: FunctionConfig, outcome: Outcome) -> str:
    """Lambda's log tail: START/END/REPORT lines around the captured output, last 4 KB, base64."""
    text = invocation_text(invocation_id, fn.version, fn.memory_mb, outcome).encode()
    return base64.b64encode(text[-TAIL_BYTES:]).decode()


# --- the Invoke API --------------------------------------------------------------------------


async def invoke(request: web.Request) -> web.StreamResponse:
    dispatcher = request.app[DISPATCHER]
    try:
        name, qualifier = parse_function_name(
            request.match_info["name"], request.query.get("Qualifier")
        )
    except ValueError as exc:
        return lambda_error(400, "InvalidParameterValueException", str(exc))
    try:
        fn = dispatcher.function(name)
        target = dispatcher.versions.resolve(fn, qualifier).fn  # a weighted alias picks here
    except UnknownFunctionError:
        return lambda_error(404, "ResourceNotFoundException", f"Function not found: {name}")
    except DeployError as exc:
        return lambda_error(exc.status, exc.code, exc.message)
    kind = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
    if kind not in ("RequestResponse", "Event", "DryRun"):
        return lambda_error(
            400, "InvalidParameterValueException", f"unknown X-Amz-Invocation-Type {kind!r}"
        )
    if problem := _header_problem(request, kind):
        return lambda_error(400, "InvalidRequestContentException", problem)
    limit = MAX_ASYNC_PAYLOAD if kind == "Event" else MAX_SYNC_PAYLOAD
    if request.content_length is not None and request.content_length > limit:
        return _too_large(request.content_length, limit)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > limit:
            return _too_large(size, limit)
        chunks.append(chunk)
    body = b"".join(chunks).strip() or b"{}"
    if problem := _json_problem(body):
        return lambda_error(
            400,
            "InvalidRequestContentException",
            f"Could not parse request body into json: {problem}",
        )
    if kind == "DryRun":
        return web.Response(status=204, headers={"x-amzn-RequestId": str(uuid.uuid4())})
    if kind == "Event":
        return await _invoke_async(dispatcher, fn, body, request, target.version)
    return await _invoke_sync(dispatcher, fn, target, body, request, qualifier)


def _json_problem(raw: bytes) -> str | None:
    """Why `raw` is not a JSON document the daemon takes, or None."""
    if json_too_deep(raw):
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        return str(exc)
    except RecursionError:  # only if the depth bound and the stack disagree: still the caller's
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    return None


def _header_problem(request: AnyRequest, kind: str) -> str | None:
    """What is wrong with a header the daemon uses: one it stores or passes on must be UTF-8
    (aiohttp keeps other bytes as lone surrogates, which no encoder takes)."""
    sdk_id = request.headers.get("amz-sdk-invocation-id")
    if sdk_id is not None and not is_utf8(sdk_id):
        return "header amz-sdk-invocation-id is not valid UTF-8"
    context = request.headers.get("X-Amz-Client-Context")
    if not context or kind != "RequestResponse":  # Lambda passes it on sync calls only
        return None
    if len(context) > MAX_CLIENT_CONTEXT:
        return f"X-Amz-Client-Context is longer than {MAX_CLIENT_CONTEXT} bytes"
    try:
        decoded = base64.b64decode(context.encode("ascii"))  # as lenient as the worker
    except ValueError:  # UnicodeEncodeError and binascii.Error are ValueErrors
        return "X-Amz-Client-Context is not base64"
    problem = _json_problem(decoded)
    if problem is None and not decoded.lstrip().startswith(b"{"):
        problem = "not a JSON object"
    return f"X-Amz-Client-Context is not base64 of a JSON object: {problem}" if problem else None


def _too_large(size: int, limit: int) -> web.Response:
    return lambda_error(
        413,
        "RequestTooLargeException",
        f"Request must be smaller than {limit} bytes for the invoke operation (got {size})",
    )


async def _invoke_async(
    dispatcher: Dispatcher, fn: FunctionConfig, body: bytes, request: web.Request, version: str
) -> web.Response:
    sdk_id = request.headers.get("amz-sdk-invocation-id")
    try:
        accepted = await dispatcher.accept(
            fn.name,
            body,
            trigger="api",
            trigger_id="api",
            dedupe_key=f"api:{sdk_id}" if sdk_id else None,
            qualifier=version,
        )
    except StoreUnavailableError as exc:
        return lambda_error(
            503, "ServiceException", f"cannot store the event: {exc}", kind="Service"
        )
    except UnknownFunctionError:  # a reload removed it since it was looked up
        return lambda_error(404, "ResourceNotFoundException", f"Function not found: {fn.name}")
    return web.Response(status=202, headers={"x-amzn-RequestId": accepted.invocation_id})


async def _invoke_sync(
    dispatcher: Dispatcher,
    fn: FunctionConfig,
    target: FunctionConfig,
    body: bytes,
    request: web.Request,
    qualifier: str | None,
) -> web.Response:
    """Run `target` (the version `qualifier` resolved to) of `fn`; the answer names it."""

    def call() -> Awaitable[tuple[str, Outcome]]:
        return dispatcher.invoke_sync(
            fn.name,
            body,
            trigger="api",
            invoked_arn=invoked_arn(fn, qualifier),
            client_context=request.headers.get("X-Amz-Client-Context"),
            target=target,
        )

    sdk_id = request.headers.get("amz-sdk-invocation-id")
    try:
        if sdk_id:
            cache = request.app[SYNC_RESULTS]
            key = cache.key(fn.name, sdk_id, body)
            (invocation_id, outcome), repeat = await cache.run(key, call)
            if repeat:
                log.info(
                    "invocation_deduplicated",
                    invocation_id=invocation_id,
                    function=fn.name,
                    sdk_invocation_id=sdk_id,
                )
        else:
            invocation_id, outcome = await call()
    except QueueFullError as exc:
        return lambda_error(
            429,
            "TooManyRequestsException",
            str(exc),
            headers={"Retry-After": "1"},
            extra={"Reason": "ReservedFunctionConcurrentInvocationLimitExceeded"},
        )
    except ShuttingDownError as exc:  # it never started; boto3 retries a 503
        return lambda_error(
            503, "ServiceException", str(exc), kind="Service", headers={"Retry-After": "5"}
        )
    except UnknownFunctionError:
        return lambda_error(404, "ResourceNotFoundException", f"Function not found: {fn.name}")
    headers = {
        "x-amzn-RequestId": invocation_id,
        "X-Amz-Executed-Version": target.version,
        "Content-Type": "application/json",
    }
    if outcome.status is not Status.SUCCEEDED:
        headers["X-Amz-Function-Error"] = "Unhandled"
    if request.headers.get("X-Amz-Log-Type") == "Tail":
        headers["X-Amz-Log-Result"] = tail_log(invocation_id, target, outcome)
    return web.Response(status=200, body=outcome.payload, headers=headers)


# --- function configuration (enough for boto3's get/list calls and waiters) -----------------


# --- admin endpoints ------------------------------------------------------------------------


async def health(request: AnyRequest) -> web.Response:
    """200 with the store's and the pool's figures; 503 with the reason while starting,
    reloading or draining (the service's lifecycle), while the store cannot take writes, or
    while the pool cannot start workers (the store's reason first when both are degraded)."""
    lifecycle = request.app.get(LIFECYCLE)
    if lifecycle is not None and (reason := lifecycle()) is not None:
        state = reason.partition(":")[0]
        return web.json_response({"status": state, "reason": reason}, status=503)
    monitor = request.app.get(STORE_HEALTH)
    if monitor is None:  # an API built without the service (tests of the handlers alone)
        return web.json_response({"status": "ok"})
    body = monitor.report()
    degraded = monitor.degraded
    if (starts := request.app.get(POOL_HEALTH)) is not None:
        pool = body["pool"] = starts.report()
        if starts.degraded and not degraded:
            degraded = True
            body.update({key: pool[key] for key in ("status", "reason", "error", "since")})
    body["http"] = {key.partition(".")[0]: stats.report() for key, stats in STATS.items()}
    body["sandbox"] = bubblewrap.describe()
    return web.json_response(body, status=503 if degraded else 200, dumps=dumps)


# --- the app --------------------------------------------------------------------------------


def _auth_middleware(
    token: str, invoke_token: bytes | None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = token.encode()
    session = cookie_value(expected)

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if reason := cross_site(request):
            return _cross_site_refused(request, reason)
        if (
            request.path == "/health"
            or is_public(request)
            or _authorized(request, expected)
            or carries_session(request, session)
            or _lambda_call(request, invoke_token)
        ):
            return await handler(request)
        _log_unauthorized(request)
        return lambda_error(401, "UnrecognizedClientException", "a valid bearer token is required")

    return check


@web.middleware
async def _same_site_only(
    request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Without a token: still no change that another site's page starts (daemon/http/session.py)."""
    if reason := cross_site(request):
        return _cross_site_refused(request, reason)
    return await handler(request)


def _cross_site_refused(request: AnyRequest, reason: str) -> web.Response:
    _log_unauthorized(request, "api_cross_site_refused")
    return lambda_error(403, "AccessDeniedException", f"cross-site request refused: {reason}")


def _authorized(request: AnyRequest, expected: bytes) -> bool:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return hmac.compare_digest(_utf8(header[7:].strip()), expected)
    # boto3 signs with SigV4 and cannot send a bearer token: accept the token as access key id.
    if header.startswith("AWS4-HMAC-SHA256") and "Credential=" in header:
        key_id = header.split("Credential=", 1)[1].split("/", 1)[0]
        return hmac.compare_digest(_utf8(key_id), expected)
    return False


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # aiohttp keeps undecodable header bytes so


_unauthorized_log = Throttle()


def _log_unauthorized(request: AnyRequest, event: str = "api_unauthorized") -> None:
    suppressed = _unauthorized_log.allow(event, time.monotonic())
    if suppressed is not None:  # a flood of them is logged a few lines at a time
        log.warning(
            event,
            path=request.path[:200],
            remote=request.remote,
            suppressed=suppressed,
        )


def sdk_environment(address: tuple[str, int], invoke_token: str | None) -> dict[str, str]:
    """What a handler's own AWS SDK needs to call this daemon's Lambda API: boto3 (1.28 and
    later) and the AWS CLI take the endpoint from AWS_ENDPOINT_URL_LAMBDA; the credentials are
    the daemon's invoke token as access key id when the API wants a token, else placeholders
    (the SDK signs every call, so it needs some). AWS_REGION is set with the reserved variables.
    A function's own `env` may set any of these for itself (to reach real AWS, say)."""
    host, port = address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return {
        "AWS_ENDPOINT_URL_LAMBDA": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": invoke_token or "lambdaemon",
        "AWS_SECRET_ACCESS_KEY": "lambdaemon",
    }


def _lambda_call(request: AnyRequest, invoke_token: bytes | None) -> bool:
    """A call of Lambda's function API signed with the workers' invoke token: an invocation
    or a read, never a change (a deploy, a publish, an alias) that needs the API token."""
    return (
        invoke_token is not None
        and request.path.startswith(_FUNCTIONS_PREFIX)
        and (request.method == "GET" or _INVOKE_PATH.fullmatch(request.path) is not None)
        and _authorized(request, invoke_token)
    )


_FUNCTIONS_PREFIX = "/2015-03-31/functions"


def _api_router(token: bytes | None, invoke_token: bytes | None = None) -> Router:
    """How daemon/http/wire.py serves the API listener: Invoke calls by plain function name, and
    /health, straight to their handlers; a request without the token (the header, or the
    dashboard's cookie) or started by another site's page is refused before its body is read;
    everything else by the app's routes (and its middleware)."""
    refused = functools.partial(
        lambda_error, 401, "UnrecognizedClientException", "a valid bearer token is required"
    )
    session = cookie_value(token) if token is not None else None

    def route(request: WireRequest) -> Handler | web.StreamResponse | None:
        if request.method == "GET" and request.path == "/health":
            return health  # open to all, as with the middleware
        if reason := cross_site(request):
            return _cross_site_refused(request, reason)
        if (
            token is not None
            and not is_public(request)
            and not _authorized(request, token)
            and not carries_session(request, session)
            and not _lambda_call(request, invoke_token)
        ):
            _log_unauthorized(request)
            return refused()
        match = _INVOKE_PATH.fullmatch(request.path) if request.method == "POST" else None
        if match is None:
            if request.method == "GET" and request.path == "/metrics":
                return metrics  # behind the token, as everything but /health
            if request.method == "PUT" and _CODE_PATH.fullmatch(request.path):
                request.max_body = MAX_CODE_REQUEST  # UpdateFunctionCode: a zip of up to 50 MiB
            return None
        if (request.content_length or 0) > MAX_SYNC_PAYLOAD:  # refused before it is read
            return _too_large(request.content_length or 0, MAX_SYNC_PAYLOAD)
        request.match_info = {"name": match[1]}
        return invoke

    return route


def build_api(
    config: Config, dispatcher: Dispatcher, store: Store, invoke_token: str | None = None
) -> web.Application:
    """The API app. `invoke_token`: what workers sign with (sdk_environment); it opens Lambda's
    function API (Invoke, GetFunction, ...) and nothing else."""
    middlewares, token = [], None
    workers = invoke_token.encode() if invoke_token else None
    if config.api.token_file:
        token = read_secret(config, config.api.token_file, "api.token_file")
        middlewares.append(_auth_middleware(token, workers))
    else:
        middlewares.append(_same_site_only)
    app = web.Application(client_max_size=MAX_SYNC_PAYLOAD + 1024, middlewares=middlewares)
    app[FAST_ROUTES] = _api_router(token.encode() if token else None, workers)
    app[DASHBOARD_TOKEN] = token.encode() if token else None
    app[DISPATCHER] = dispatcher
    app[STORE] = store
    app[SYNC_RESULTS] = SyncResultCache()
    fn_path = "/2015-03-31/functions/{name}"
    app.router.add_post(f"{fn_path}/invocations", invoke)
    add_management_routes(app)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    add_admin_routes(app)
    add_log_routes(app)
    add_history_routes(app)
    add_dashboard_routes(app)
    add_drain_route(app)
    # Last: any other call of Lambda's API gets an error boto3 can model, not aiohttp's text.
    app.router.add_route("*", r"/{version:20\d\d-\d\d-\d\d}/{operation:.*}", unsupported)
    return app


async def unsupported(request: web.Request) -> web.Response:
    """A Lambda API call that lambdaemon does not implement (event source mappings, layers,
    function URLs' configuration, ...): a modeled error naming it, which boto3 raises as a
    ClientError with this code."""
    return lambda_error(
        400,
        "UnsupportedOperationException",
        f"lambdaemon does not implement {request.method} {request.path[:200]} of the Lambda API",
    )


async def start_site(
    app: web.Application,
    listen: str,
    key: str,
    *,
    limits: Callable[[], ListenerSettings],
    max_body: Callable[[], int],
    drain_s: float = 1.0,
    router: Router | None = None,
) -> web.AppRunner:
    """Serve `app` on `listen` inside our own lifecycle (not run_app: signals stay ours).

    Every connection is daemon/http/wire.py's: `router` picks what serves a request (None: the
    app's routes), bodies are held to `max_body()` and connections to `limits()`, both read live.
    On cleanup the listener stops accepting and in-flight requests get `drain_s` to finish.
    """
    host, port = listen_host(listen, "", key)
    runner = FastRunner(app, access_log=None, handle_signals=False, shutdown_timeout=drain_s)
    await runner.setup()
    site = FastSite(
        runner,
        host,
        port,
        key=key,
        router=router,
        max_body=max_body,
        limits=limits,
        drain_s=drain_s,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {listen} ({key}): {exc.strerror or exc}") from exc
    log.info("listener_started", key=key, listen=listen, started_at=time.time())
    return runner
