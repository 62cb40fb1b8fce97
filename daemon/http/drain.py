"""POST /v1/mqtt/drain: take over a share-group node's MQTT session for good (`lambdaemon
mqtt-drain CLIENT_ID`).

A node that will not come back leaves messages at the broker: Mosquitto keeps what it had not
acked and its turns in the group for its session (docs/triggers.md). Any live node can drain
that session: triggers/mqtt.py, MqttSource.drain. The answer comes once it is drained.
"""

from __future__ import annotations

from typing import Annotated

import aiomqtt
import msgspec
from aiohttp import web
from msgspec import Meta

from daemon.errors import StoreUnavailableError
from daemon.http.metrics import METRICS
from triggers.mqtt import DRAIN_QUIET_S, MqttSource


class DrainRequest(msgspec.Struct, forbid_unknown_fields=True):
    client_id: Annotated[str, Meta(min_length=1, max_length=128)]
    quiet_s: Annotated[float, Meta(gt=0, le=60)] = DRAIN_QUIET_S


def add_drain_route(app: web.Application) -> None:
    app.router.add_post("/v1/mqtt/drain", drain_mqtt)


async def drain_mqtt(request: web.Request) -> web.Response:
    """200 with `client_id`, `session_present` (false: the broker had no such session) and
    `messages` (taken and stored); 400 for a bad body or this daemon's own client id, 404
    without mqtt triggers, 502 when the broker cannot be reached, 503 when the store cannot
    take them (nothing is acknowledged then: the session keeps them)."""
    parts = request.app.get(METRICS)
    source = parts.sources.get("mqtt") if parts is not None and parts.sources else None
    if not isinstance(source, MqttSource):
        return _error(404, "this daemon has no mqtt triggers")
    try:
        body = msgspec.json.decode(await request.read(), type=DrainRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _error(400, f"invalid body: {exc}")
    try:
        report = await source.drain(body.client_id, body.quiet_s)
    except ValueError as exc:
        return _error(400, str(exc))
    except RuntimeError as exc:
        return _error(503, str(exc))
    except aiomqtt.MqttError as exc:
        return _error(502, f"the broker: {exc}")
    except StoreUnavailableError as exc:
        return _error(503, str(exc))
    return web.json_response(report)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
