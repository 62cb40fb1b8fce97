"""The admin JSON endpoints under /v1/: functions, invocations, replays and dead letters.

History pages (GET /v1/invocations) and usage are daemon/http/history.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from daemon.dispatcher import Dispatcher
from daemon.errors import BatchReplayError, StoreUnavailableError, UnknownFunctionError
from daemon.fleet import Node
from daemon.store.sqlite import Store
from daemon.untrusted import json_too_deep

DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher", Dispatcher)
STORE: web.AppKey[Store] = web.AppKey("store", Store)
# Starts a reload (the service's request_reload(force)): a task whose result is its report.
RELOAD: web.AppKey[Callable[[bool], asyncio.Task[dict[str, Any]]]] = web.AppKey("reload")
NODE: web.AppKey[Node] = web.AppKey("node", Node)
_json = msgspec.json.Encoder()


def add_admin_routes(app: web.Application) -> None:
    """Serve the /v1/ endpoints from `app`, whose DISPATCHER and STORE are set."""
    app.router.add_get("/v1/functions", list_functions)
    app.router.add_get("/v1/invocations/{id}", get_invocation)
    app.router.add_post("/v1/invocations/{id}/replay", replay_invocation)
    app.router.add_get("/v1/dead-letters", list_dead_letters)
    app.router.add_post("/v1/dead-letters/redrive", redrive_dead_letters)
    app.router.add_get("/v1/dead-letters/{id}", get_dead_letter)
    app.router.add_post("/v1/reload", reload_config)
    app.router.add_get("/v1/nodes", list_nodes)


def _dumps(value: Any) -> str:
    return _json.encode(value).decode()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def list_functions(request: web.Request) -> web.Response:
    dispatcher = request.app[DISPATCHER]
    stats = dispatcher.stats()
    rows = [
        {
            "name": fn.name,
            "handler": fn.handler,
            "code": fn.code,
            "version": fn.version,
            "timeout_s": fn.timeout_s,
            "memory_mb": fn.memory_mb,
            "concurrency": fn.concurrency,
            "min_warm": fn.min_warm,
            "idle_timeout_s": fn.idle_timeout_s,
            "retries": fn.retries,
            "retry_backoff_s": list(fn.retry_backoff_s),
            "max_event_age_s": fn.max_event_age_s,
            "on_success": fn.on_success,
            "on_failure": fn.on_failure,
            "triggers": [msgspec.to_builtins(t) for t in fn.triggers],
            **stats[fn.name],
        }
        for fn in dispatcher.functions.values()
    ]
    return web.json_response({"functions": rows}, dumps=_dumps)


async def get_invocation(request: web.Request) -> web.Response:
    store = request.app[STORE]
    await store.barrier()
    row = await store.get(request.match_info["id"])
    if row is None:
        return web.json_response({"error": f"no invocation {request.match_info['id']}"}, status=404)
    return web.json_response(present(row), dumps=_dumps)


async def replay_invocation(request: web.Request) -> web.Response:
    invocation_id = request.match_info["id"]
    try:
        accepted = await request.app[DISPATCHER].replay(invocation_id)
    except (UnknownFunctionError, BatchReplayError) as exc:
        return _error(409, f"cannot replay {invocation_id}: {exc}")
    except KeyError:
        return _error(404, f"no invocation {invocation_id}")
    except StoreUnavailableError as exc:
        return _error(503, f"cannot store the event: {exc}")
    return web.json_response(
        {"invocation_id": accepted.invocation_id, "parent_id": invocation_id},
        status=202,
        dumps=_dumps,
    )


class ReloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    force: bool = False  # apply a reload that would otherwise be refused as an accident


async def reload_config(request: web.Request) -> web.Response:
    """Re-read the config file: 200 with what changed, 400 with the reason it was refused,
    409 when it looks like an accident (an empty file, every function removed) and was not
    forced with `{"force": true}`."""
    start = request.app.get(RELOAD)
    if start is None:
        return _error(503, "this API has no daemon to reload")
    try:
        body = msgspec.json.decode(await request.read() or b"{}", type=ReloadRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _error(400, f"invalid body: {exc}")
    task = start(body.force)
    await asyncio.wait({task})  # not the task itself: a cancelled reload is an answer too
    if task.cancelled():
        return _error(503, "the daemon is shutting down; the config was not reloaded")
    report = task.result()
    status = 200 if report["reloaded"] else 400 if report.get("config_error") else 503
    status = 409 if report.get("needs_force") else status
    return web.json_response(report, status=status, dumps=_dumps)


# --- dead letters ---------------------------------------------------------------------------


class RedriveRequest(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[str] | None = None
    all: bool = False
    function: str | None = None


async def list_nodes(request: web.Request) -> web.Response:
    """The store's nodes, alive or gone within the last hour (daemon/fleet.py), with their
    load: this node's as it is now, the others' as of their last heartbeat."""
    store, dispatcher = request.app[STORE], request.app[DISPATCHER]
    node = request.app.get(NODE)
    now, rows = await store.list_nodes()
    nodes = []
    for row in rows:
        me = row["node_id"] == store.node_id
        if me:
            state = "fenced" if node is not None and node.fenced() else "live"
        elif row["stopped_at"] is not None:
            state = "stopped"
        else:
            state = "live" if row["lease_until"] >= now else "dead"
        load = dispatcher.load() if me else json.loads(row["load"]) if row["load"] else None
        nodes.append(
            {
                "node_id": row["node_id"],
                "state": state,
                "this_node": me,
                "host": row["host"],
                "pid": row["pid"],
                "started_at": iso(row["started_at"]),
                "heartbeat_at": iso(row["heartbeat_at"]),
                "lease_s": row["lease_s"],
                "lease_until": iso(row["lease_until"]),
                "stopped_at": iso(row["stopped_at"]),
                "load": load,
            }
        )
    return web.json_response({"nodes": nodes}, dumps=_dumps)


async def list_dead_letters(request: web.Request) -> web.Response:
    limit = _limit(request)
    if limit is None:
        return _error(400, "limit must be a whole number from 1 to 1000")
    store = request.app[STORE]
    await store.barrier()
    rows = await store.list_dead_letters(request.query.get("function") or None, limit)
    return web.json_response({"dead_letters": [present(r) for r in rows]}, dumps=_dumps)


async def get_dead_letter(request: web.Request) -> web.Response:
    store = request.app[STORE]
    await store.barrier()
    row = await store.get(request.match_info["id"])
    if row is None or row["dead_letter_reason"] is None:
        return _error(404, f"no dead letter {request.match_info['id']}")
    return web.json_response(present(row), dumps=_dumps)


async def redrive_dead_letters(request: web.Request) -> web.Response:
    try:
        body = msgspec.json.decode(await request.read() or b"{}", type=RedriveRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _error(400, f"invalid body: {exc}")
    if (body.ids is None) == (not body.all):
        return _error(400, 'give either "ids": [...] or "all": true')
    if body.ids is not None and not 1 <= len(body.ids) <= 1000:
        return _error(400, '"ids" must hold 1 to 1000 ids')
    try:
        redriven = await request.app[DISPATCHER].redrive(body.ids, body.function)
    except StoreUnavailableError as exc:
        return _error(503, f"cannot store the redrive: {exc}")
    not_redriven = sorted(set(body.ids or ()) - set(redriven))
    return web.json_response({"redriven": redriven, "not_redriven": not_redriven}, dumps=_dumps)


def _limit(request: web.Request) -> int | None:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return None
    return limit if 1 <= limit <= 1000 else None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def present(row: dict[str, Any]) -> dict[str, Any]:
    """A record for JSON: times as ISO 8601, event and result decoded."""
    out = dict(row)
    for key in (
        "queued_at",
        "started_at",
        "ended_at",
        "next_attempt_at",
        "dead_lettered_at",
        "redriven_at",
    ):
        if key in out:
            out[key] = iso(out[key])
    for key in ("event", "result"):
        if isinstance(out.get(key), bytes | memoryview):
            raw = bytes(out[key])
            try:
                # A handler may return JSON deeper than a parser's stack allows: shown as text.
                if json_too_deep(raw):
                    raise msgspec.DecodeError("nested too deep")
                out[key] = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                out[key] = raw.decode("utf-8", "replace")
    for attempt in out.get("attempts", []) or []:
        for key in ("started_at", "ended_at"):
            if key in attempt:
                attempt[key] = iso(attempt[key])
    return out
