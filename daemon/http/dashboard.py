"""The dashboard: a static page (daemon/http/ui/) that draws the admin API's JSON in the browser,
its sign-in and sign-out, and GET /v1/stats, the figures it charts.

    GET  /, /ui                 the page (no data in it: it fetches the JSON API)
    GET  /ui/static/NAME        its script, style sheet and the vendored uPlot
    GET  /ui/session            {"token_required": bool, "signed_in": bool}
    POST /ui/login              form field `token`: sets the session cookie (daemon/http/session.py)
    POST /ui/logout             clears it
    GET  /v1/stats?window=1h[&function=NAME]   per function figures of the window

The files are read on the first request and kept (about 70 KB), so an idle daemon that nobody
looks at holds none of it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import msgspec
from aiohttp import web

from daemon.http.admin import DISPATCHER, STORE, iso
from daemon.http.metrics import METRICS
from daemon.http.session import carries_session, clear_cookie, cookie_value, set_cookie
from daemon.http.wire import AnyRequest

# The API token, when `[api] token_file` is set (None: the API is open, and so is the page).
DASHBOARD_TOKEN: web.AppKey[bytes | None] = web.AppKey("dashboard_token")
BUCKETS = 60
MAX_WINDOW_S = 7 * 86_400
_WINDOW = re.compile(r"(\d{1,6})([mhd])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86_400}
_PUBLIC = frozenset({"/", "/ui", "/ui/session", "/favicon.ico"})
_STATS_PARAMS = frozenset({"window", "function"})
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# The page runs only its own files: no inline script, nothing from elsewhere, not in a frame.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form's Origin "null"
    "Cache-Control": "no-cache",
}
_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str


_assets: dict[str, _Asset] = {}


def add_dashboard_routes(app: web.Application) -> None:
    """Serve the page and its endpoints from `app`, whose DISPATCHER, STORE and
    DASHBOARD_TOKEN are set."""
    app.router.add_get("/", page)
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/static/{name:.+}", static)
    app.router.add_get("/ui/session", session)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)
    app.router.add_get("/v1/stats", stats)


def is_public(request: AnyRequest) -> bool:
    """What anyone may ask for without the token: the page, its files, and signing in or out."""
    path = request.path
    if request.method in ("GET", "HEAD"):
        return path in _PUBLIC or path.startswith("/ui/static/")
    return request.method == "POST" and path in ("/ui/login", "/ui/logout")


def _asset(name: str) -> _Asset | None:
    if not _assets:
        _load(resources.files("daemon.http") / "ui", "")
    return _assets.get(name)


def _load(folder: Any, prefix: str) -> None:
    for entry in folder.iterdir():
        if entry.is_dir():
            _load(entry, f"{prefix}{entry.name}/")
            continue
        suffix = "." + entry.name.rpartition(".")[2]
        if suffix in _TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            _assets[prefix + entry.name] = _Asset(body, _TYPES[suffix], etag)


def _serve(request: AnyRequest, name: str, headers: dict[str, str]) -> web.Response:
    asset = _asset(name)
    if asset is None:
        return web.json_response({"error": f"no file {name[:100]!r} in the dashboard"}, status=404)
    headers = {**headers, "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


async def page(request: web.Request) -> web.Response:
    return _serve(request, "index.html", _PAGE_HEADERS)


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name == "index.html":
        return _serve(request, name, _PAGE_HEADERS)
    return _serve(request, name, {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


async def no_icon(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "max-age=86400"})


def _session_of(request: AnyRequest) -> bytes | None:
    token = request.app[DASHBOARD_TOKEN]
    return cookie_value(token) if token is not None else None


async def session(request: web.Request) -> web.Response:
    token = request.app[DASHBOARD_TOKEN]
    signed_in = token is None or carries_session(request, _session_of(request))
    return web.json_response({"token_required": token is not None, "signed_in": signed_in})


async def login(request: web.Request) -> web.Response:
    """The sign-in form's POST: a cookie and back to the page, or back with `login=failed`."""
    token = request.app[DASHBOARD_TOKEN]
    if token is None:
        return _see_other("/ui")
    form = parse_qs((await request.read()).decode("utf-8", "replace"), max_num_fields=4)
    given = (form.get("token") or [""])[0].strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, token):
        return _see_other("/ui?login=failed")
    return _see_other("/ui", {"Set-Cookie": set_cookie(cookie_value(token))})


async def logout(request: web.Request) -> web.Response:
    return _see_other("/ui", {"Set-Cookie": clear_cookie()})


def _see_other(location: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=303, headers={"Location": location, "Cache-Control": "no-store", **(headers or {})}
    )


# --- GET /v1/stats ------------------------------------------------------------------------


def parse_window(value: str) -> int:
    """`15m`, `1h`, `1d` as seconds, from a minute to 7 days; ValueError saying why not."""
    match = _WINDOW.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value[:50]!r} is not a duration like 15m, 1h or 1d")
    seconds = int(match[1]) * _UNIT_S[match[2]]
    if not 60 <= seconds <= MAX_WINDOW_S:
        raise ValueError(f"{value!r} is outside 1m to 7d")
    return seconds


async def stats(request: web.Request) -> web.Response:
    """Per function: its state now (lanes and workers) and what the store holds of the window."""
    query = request.query
    if unknown := sorted(set(query) - _STATS_PARAMS):
        return _bad(f"unknown parameter {unknown[0][:50]!r} (known: function, window)")
    try:
        window_s = parse_window(query.get("window", "1h"))
    except ValueError as exc:
        return _bad(f"window: {exc}")
    dispatcher = request.app[DISPATCHER]
    names = list(dispatcher.functions)
    if (only := query.get("function")) is not None:
        if only not in dispatcher.functions:
            return web.json_response({"error": f"no function {only[:100]!r}"}, status=404)
        names = [only]
    bucket_s = window_s / BUCKETS
    end = (time.time() // bucket_s + 1) * bucket_s  # the last bucket holds now
    store = request.app[STORE]
    await store.barrier()
    figures = await store.window_stats(names, end - window_s, end, BUCKETS)
    lanes, workers = dispatcher.stats(), dispatcher.worker_stats()
    for name, fn in figures.items():
        _present(fn, lanes.get(name, {}), workers.get(name, {}), window_s)
    body = {
        "window_s": window_s,
        "bucket_s": bucket_s,
        "start": iso(end - window_s),
        "end": iso(end),
        "functions": figures,
        "sources": _source_samples(request),
    }
    return web.json_response(body, dumps=lambda value: _json.encode(value).decode())


def _present(
    fn: dict[str, Any], lane: dict[str, int], workers: dict[str, int], window_s: int
) -> None:
    idle, busy = workers.get("idle", 0), workers.get("busy", 0)
    fn["workers"] = {"idle": idle, "busy": busy}
    fn["lane"] = lane
    waiting = lane.get("backlog", 0) + lane.get("waiting", 0)
    fn["state"] = "busy" if busy or waiting else "warm" if idle else "cold"
    fn["rate_per_min"] = round(fn["invocations"] / (window_s / 60), 3)
    fn["error_rate"] = round(fn["errors"] / fn["invocations"], 4) if fn["invocations"] else None
    if fn["last"] is not None:
        fn["last"]["queued_at"] = iso(fn["last"]["queued_at"])
    for trigger in fn["triggers"].values():
        trigger["last_at"] = iso(trigger["last_at"])


def _source_samples(request: web.Request) -> list[dict[str, Any]]:
    """What the running trigger sources report of themselves (as for GET /metrics): MQTT's
    connection, each cron trigger's last fire, each folder's pending files."""
    parts = request.app.get(METRICS)
    if parts is None or parts.sources is None:
        return []
    return [
        {"name": sample.name, "labels": sample.labels, "value": sample.value}
        for sample in parts.sources.samples()
    ]


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)
