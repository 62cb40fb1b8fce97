"""GET /v1/logs: a function's log lines since a time, and with `follow`, every line after them
as it happens; one JSON object per line (NDJSON), or server-sent events for a browser.

    GET /v1/logs?function=NAME&since=10m&status=failed&follow=1[&format=sse]

The past comes from the store, page by page; the live lines from the dispatcher's LogHub
(daemon/tail.py). The follower is registered before the store is read, and an attempt already
printed from the store is not printed again, so a line is neither lost nor doubled at the seam.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from daemon.http.admin import DISPATCHER, STORE
from daemon.http.history import parse_time
from daemon.http.wire import StreamedResponse
from daemon.models import Status
from daemon.tail import LogLine, record_lines

_PAGE = 500
_PARAMS = frozenset({"function", "since", "status", "follow", "format"})
_encode = msgspec.json.Encoder().encode


def add_log_routes(app: web.Application) -> None:
    app.router.add_get("/v1/logs", logs)


async def logs(request: web.Request) -> web.StreamResponse:
    query = request.query
    if unknown := sorted(set(query) - _PARAMS):
        return _refused(f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(_PARAMS))})")
    dispatcher = request.app[DISPATCHER]
    function = query.get("function") or None
    if function is not None and function not in dispatcher.functions:
        return web.json_response({"error": f"no function {function!r}"}, status=404)
    status = query.get("status") or None
    if status is not None and status not in Status.__members__.values():
        return _refused(f"unknown status {status!r}")
    try:
        since = parse_time(query.get("since", "10m"), time.time())
    except ValueError as exc:
        return _refused(f"since: {exc}")
    follow = query.get("follow", "0").lower() in ("1", "true", "yes")
    sse = query.get("format") == "sse" or "text/event-stream" in request.headers.get("Accept", "")
    if query.get("format") not in (None, "sse", "ndjson"):
        return _refused(f"format: {query['format']!r} is not ndjson or sse")
    # Registered first: what ends while the store is read is in the follower's queue.
    follower = dispatcher.log_hub.follow(function, status) if follow else None
    lines = _lines(request, function, status, since, follower)
    return StreamedResponse(
        _framed(lines, sse),
        content_type="text/event-stream" if sse else "application/x-ndjson",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _refused(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _lines(
    request: web.Request, function: str | None, status: str | None, since: float, follower: Any
) -> AsyncIterator[LogLine]:
    store, dispatcher = request.app[STORE], request.app[DISPATCHER]
    printed: set[tuple[str, int]] = set()
    try:
        await store.barrier()  # what finished before this call is in the store
        after: tuple[float, str] | None = None
        while True:
            rows = await store.log_records(function, since, status, after, _PAGE)
            for row in rows:
                fn = dispatcher.functions.get(row["function"])
                printed.add((row["id"], row["attempt"]))
                for line in record_lines(row, fn.memory_mb if fn else 0):
                    yield line
            if len(rows) < _PAGE:
                break
            after = (rows[-1]["queued_at"], rows[-1]["id"])
        if follower is None:
            return
        async for line in follower.lines():
            if (line.invocation_id, line.attempt) not in printed:
                yield line
    finally:
        if follower is not None:
            follower.close()


async def _framed(lines: AsyncIterator[LogLine], sse: bool) -> AsyncIterator[bytes]:
    """Lines as NDJSON, or as server-sent events (a `missed` notice as its own event)."""
    try:
        async for line in lines:
            data = _encode(line)
            if not sse:
                yield data + b"\n"
            elif line.missed:
                yield b"event: missed\ndata: " + data + b"\n\n"
            else:
                yield b"data: " + data + b"\n\n"
    finally:
        await lines.aclose()  # type: ignore[attr-defined]
