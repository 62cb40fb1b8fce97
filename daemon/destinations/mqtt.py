"""The daemon's own MQTT publisher, for `mqtt:` destinations (relay.py hands it its records).

The connection settings are the [mqtt] section's, read the same way as the MQTT trigger's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.backoff import Backoff
from daemon.config import Config
from daemon.credentials import mqtt_connection
from daemon.errors import ConfigError, MqttPublishError
from triggers.mqtt import BACKOFF_S, MESSAGE_ID

log = structlog.get_logger("lambdaemon.destinations.mqtt")


class _PublishingClient(aiomqtt.Client):
    """aiomqtt's client, keeping the PUBACK reason code that 2.5.1 drops."""

    puback: Any = None

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        self.puback = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)


class MqttPublisher:
    """Publishes QoS 1 messages for the daemon itself (destinations) on its own connection.

    Its client id is `<client_id>-out`, so it never takes over the subscriber's session. It
    starts clean and keeps nothing between connections: the caller holds the durable copy and
    publishes again what got no PUBACK. Each connection gets a fresh client, so paho never
    re-sends a message of a dropped connection behind the caller's back. `run()` connects and
    reconnects with backoff (the broker may be down at start); `on_connected` is called on
    every connect.
    """

    def __init__(self, config: Config, on_connected: Callable[[], None] | None = None) -> None:
        if config.mqtt is None:
            raise ConfigError(config.path, "mqtt", "an mqtt: destination needs an [mqtt] section")
        self._settings = config.mqtt
        self._host, self._port, self._tls, self._password = mqtt_connection(config)
        self.client_id = f"{config.mqtt.client_id}-out"
        self._on_connected = on_connected
        self._client: _PublishingClient | None = None  # set while connected
        self._lock = asyncio.Lock()  # one message in flight: its PUBACK is the next one

    async def run(self) -> None:
        backoff = Backoff(*BACKOFF_S, jitter=(0.5, 1.0))
        while True:
            client = _PublishingClient(
                self._host,
                self._port,
                identifier=self.client_id,
                username=self._settings.username,
                password=self._password,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=True,
                keepalive=self._settings.keepalive_s,
                tls_context=self._tls,
            )
            try:
                async with client:
                    self._client = client
                    backoff.reset()
                    log.info(
                        "mqtt_publisher_connected",
                        host=self._host,
                        port=self._port,
                        client_id=self.client_id,
                    )
                    if self._on_connected is not None:
                        self._on_connected()
                    # Nothing is subscribed: reading is only how a broken connection shows up.
                    async for _ in client.messages:
                        pass
                reason = "stopped"
            except aiomqtt.MqttError as exc:
                reason = str(exc) + (f": {exc.__cause__}" if exc.__cause__ else "")
            finally:
                self._client = None
            wait = backoff.next()
            log.warning("mqtt_publisher_disconnected", reason=reason, retry_in_s=round(wait, 2))
            await asyncio.sleep(wait)

    async def publish(
        self, topic: str, payload: bytes, *, message_id: str, timeout_s: float = 10.0
    ) -> None:
        """Publish at QoS 1; return once the broker's PUBACK accepted it.

        Raises MqttPublishError: not connected, or no PUBACK in time (the connection is then
        made again, so the message cannot still arrive on it), or refused by the broker (a
        reason code of 0x80 or more; `permanent` unless it is Quota exceeded). `message_id`
        goes out as the `message-id` user property, which is the same on every repeat.
        """
        async with self._lock:
            client = self._client
            if client is None:
                raise MqttPublishError(f"not connected to the broker {self._host}:{self._port}")
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [(MESSAGE_ID, message_id)]
            props.ContentType = "application/json"
            client.puback = None
            try:
                await client.publish(topic, payload, qos=1, properties=props, timeout=timeout_s)
            except aiomqtt.MqttError as exc:
                client._client.disconnect()
                raise MqttPublishError(f"no PUBACK: {exc}") from exc
            code = client.puback
        value = getattr(code, "value", code) or 0
        if value >= 0x80:
            raise MqttPublishError(f"the broker refused it: {code}", permanent=value != 0x97)
