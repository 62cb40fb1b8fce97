"""GET /v1/invocations (history pages) and GET /v1/usage (usage metering), and their input.

Every query parameter is checked before the store is asked: an unknown one, a malformed cursor
or time, a limit out of range is a 400 whose JSON names the parameter and says what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import msgspec
from aiohttp import web

from daemon.config import DaemonSettings
from daemon.http.admin import STORE, present
from daemon.models import Status
from daemon.store.history import HistoryQuery

# The running config's [daemon] settings (prices); absent: their defaults.
DAEMON_SETTINGS: web.AppKey[Callable[[], DaemonSettings]] = web.AppKey("daemon_settings")
MAX_LIMIT = 1000
# The published prices' date, as the answer states it (docs/reference.md).
PRICES_TAKEN = "AWS Lambda x86 prices in us-east-1 as published in 2024-2025"

_HISTORY_PARAMS = frozenset(
    {"function", "status", "trigger", "version", "id", "request_id", "since", "until", "limit"}
    | {"cursor", "next"}
)
_USAGE_PARAMS = frozenset({"since", "by"})
_RELATIVE = re.compile(r"(\d{1,9})([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_CURSOR_PREFIX = "h1:"
_json = msgspec.json.Encoder()


class BadParameter(ValueError):
    """A query parameter the endpoint refuses: `name` and the reason."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name


def add_history_routes(app: web.Application) -> None:
    """Serve /v1/invocations and /v1/usage from `app`, whose STORE is set."""
    app.router.add_get("/v1/invocations", list_invocations)
    app.router.add_get("/v1/usage", get_usage)


async def list_invocations(request: web.Request) -> web.Response:
    try:
        query, limit = parse_history(request.query)
    except BadParameter as exc:
        return _bad(exc)
    store = request.app[STORE]
    await store.barrier()  # read your own writes
    rows = await store.history(query, limit + 1)  # one more: is there a next page?
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor(rows[-1]["queued_at"], rows[-1]["seq"]) if more else None
    summaries = [present({k: v for k, v in r.items() if k != "seq"}) for r in rows]
    body = {"invocations": summaries, "next": cursor}
    return web.json_response(body, dumps=_dumps)


async def get_usage(request: web.Request) -> web.Response:
    try:
        since_s, by = parse_usage(request.query)
    except BadParameter as exc:
        return _bad(exc)
    settings_of = request.app.get(DAEMON_SETTINGS)
    settings = settings_of() if settings_of is not None else DaemonSettings()
    since_day = int(since_s // 86_400)
    store = request.app[STORE]
    await store.barrier()
    rows = await store.usage(since_day, by)
    priced = [_price(row, settings) for row in rows]
    for row in priced:
        if by == "day":
            row["day"] = _day(row["day"])
    total = _price(
        {k: sum(r[k] for r in rows) for k in ("requests", "errors", "duration_ms", "billed_ms")}
        | {"mb_ms": sum(r["mb_ms"] for r in rows)},
        settings,
    )
    body = {
        "since": _day(since_day),
        "by": by,
        "prices": {
            "per_request_usd": settings.price_per_request,
            "per_gb_second_usd": settings.price_per_gb_second,
            "defaults": PRICES_TAKEN,
        },
        "usage": priced,
        "total": total,
    }
    return web.json_response(body, dumps=_dumps)


def _day(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, UTC).date().isoformat()


def _price(row: dict[str, Any], settings: DaemonSettings) -> dict[str, Any]:
    """A usage row as the API shows it: GB-seconds and what Lambda would charge for it."""
    out = {k: v for k, v in row.items() if k not in ("billed_ms", "mb_ms")}
    gb_s = (row["mb_ms"] or 0) / 1024 / 1000
    requests_usd = (row["requests"] or 0) * settings.price_per_request
    compute_usd = gb_s * settings.price_per_gb_second
    out.update(
        requests=row["requests"] or 0,
        errors=row["errors"] or 0,
        duration_ms=round(row["duration_ms"] or 0.0, 3),
        billed_duration_ms=row["billed_ms"] or 0,
        gb_seconds=round(gb_s, 6),
        cost_usd={
            "requests": round(requests_usd, 8),
            "compute": round(compute_usd, 8),
            "total": round(requests_usd + compute_usd, 8),
        },
    )
    return out


# --- parameters ----------------------------------------------------------------------------


def parse_history(params: Any) -> tuple[HistoryQuery, int]:
    """The query and page size that /v1/invocations' parameters ask for; BadParameter else."""
    _refuse_unknown(params, _HISTORY_PARAMS)
    status = _one(params, "status")
    if status is not None and status not in Status.__members__.values():
        choices = ", ".join(s.value for s in Status)
        raise BadParameter("status", f"unknown status {status!r} (one of {choices})")
    ids = [v for v in (_one(params, "id"), _one(params, "request_id")) if v is not None]
    if len(set(ids)) > 1:
        raise BadParameter("request_id", "id and request_id name different invocations")
    cursors = [v for v in (_one(params, "cursor"), _one(params, "next")) if v is not None]
    if len(cursors) > 1:
        raise BadParameter("cursor", "give the cursor once, as cursor or as next")
    now = time.time()
    since, until = _time(params, "since", now), _time(params, "until", now)
    if since is not None and until is not None and until <= since:
        raise BadParameter("until", "must be later than since")
    query = HistoryQuery(
        function=_one(params, "function"),
        status=status,
        trigger=_one(params, "trigger"),
        version=_one(params, "version"),
        id=ids[0] if ids else None,
        since=since,
        until=until,
        before=decode_cursor(cursors[0]) if cursors else None,
    )
    return query, _limit(params)


def parse_usage(params: Any) -> tuple[float, str]:
    """(since as Unix seconds, "day" or "function") from /v1/usage's parameters."""
    _refuse_unknown(params, _USAGE_PARAMS)
    since = _time(params, "since", time.time())
    by = _one(params, "by") or "day"
    if by not in ("day", "function"):
        raise BadParameter("by", f"must be day or function, not {by!r}")
    return (since if since is not None else time.time() - 30 * 86_400), by


def parse_time(text: str, now: float) -> float:
    """Unix seconds of `text`: RFC 3339 (2026-12-04T18:00:00Z), a date (UTC midnight), or an
    age before `now` (30m, 1h, 7d; also s and w). ValueError says what is accepted."""
    if match := _RELATIVE.fullmatch(text):
        return now - int(match[1]) * _UNIT_S[match[2]]
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC).timestamp()
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ValueError(
            f"{text!r} is not a time: give RFC 3339 with an offset (2026-12-04T18:00:00Z),"
            " a date (2026-12-04) or an age (30m, 1h, 7d)"
        )
    return parsed.timestamp()


def encode_cursor(queued_at: float, seq: int) -> str:
    """The opaque `next` cursor of a page whose last (oldest) record has these keys."""
    raw = f"{_CURSOR_PREFIX}{queued_at!r}:{seq}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        prefix, at, seq = raw.split(":")
        if prefix + ":" != _CURSOR_PREFIX or not math.isfinite(float(at)) or int(seq) < 0:
            raise ValueError(raw)
        return float(at), min(int(seq), 2**63 - 1)
    except (binascii.Error, ValueError):
        raise BadParameter(
            "cursor", "not a cursor this API gave out (pass `next` as it came)"
        ) from None


def _refuse_unknown(params: Any, known: frozenset[str]) -> None:
    for name in params:
        if name not in known:
            raise BadParameter(name, f"unknown parameter (known: {', '.join(sorted(known))})")


def _one(params: Any, name: str) -> str | None:
    values = params.getall(name, [])
    if len(values) > 1:
        raise BadParameter(name, "given more than once")
    if values and values[0] == "":
        raise BadParameter(name, "is empty")
    return values[0] if values else None


def _time(params: Any, name: str, now: float) -> float | None:
    text = _one(params, name)
    if text is None:
        return None
    try:
        return parse_time(text, now)
    except ValueError as exc:
        raise BadParameter(name, str(exc)) from None


def _limit(params: Any) -> int:
    text = _one(params, "limit")
    if text is None:
        return 50
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadParameter("limit", f"must be a whole number from 1 to {MAX_LIMIT}, not {text!r}")
    return int(text)


def _bad(exc: BadParameter) -> web.Response:
    return web.json_response({"error": str(exc), "parameter": exc.name}, status=400)


def _dumps(value: Any) -> str:
    return _json.encode(value).decode()
