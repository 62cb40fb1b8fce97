"""MQTT trigger source: aiomqtt on paho, MQTT v5, a persistent session, PUBACK after commit.

Delivery. Each distinct topic filter is one subscription at QoS 0 or 1 (never 2: paho sends
PUBREC before we see the message, so QoS 2 cannot be made crash-safe) with a v5 subscription
identifier, so a message reaches exactly the triggers of the subscription it was delivered for,
even when filters overlap and the broker sends one copy per subscription. A copy is committed as
one queued invocation per trigger, concurrently with other copies (the store group-commits
them); its PUBACK goes out once all of them are committed, on the connection it came in on and
in arrival order. At most RECEIVE_MAXIMUM copies are stored-but-unacked at a time: announced to
the broker as our Receive Maximum, and enforced here as well. What cannot be committed is never
acked: the connection is closed and opened again with backoff, and the broker redelivers.

Session. A fixed client id, Clean Start = 0 on every CONNECT (aiomqtt's default would wipe the
session on each re-entry of the client) and a Session Expiry Interval: the broker keeps QoS 1
messages while we are away. Every connect re-subscribes; retained messages come with the first
subscription only (Retain Handling 1), not again on every reconnect.

Sharing. With [mqtt] share_group, every filter is subscribed as $share/<group>/<filter>: the
daemons of a fleet split the messages. A message still carries its own topic and the shared
subscription's identifier, so routing is unchanged. Each node has its own client id (session);
Mosquitto keeps a dead member's unacked messages and its turns for its session
(tests/triggers/test_mqtt_share.py): the node gets them when it is back, or a live node drains
that session (MqttSource.drain: POST /v1/mqtt/drain, or by itself in a fleet on one store). A
client id used twice shows as "session taken over" (0x8E) or, from Mosquitto 2.0, as
connections ended soon after they were made (MqttSource._contested).

Redelivery (DUP = 1) maps to the first delivery's record, never to a new one:
- a publisher-set user property `message-id` keys the record (hash of topic and id), DUP or
  not: a re-publication with the same id is the same event; with share_group the key is the
  group's, not the client id's, so on a shared store any node finds it;
- otherwise each QoS 1 copy gets an arrival number, stored in its key with its packet id and a
  digest of topic and payload. A DUP copy is a redelivery of the newest stored copy that had its
  packet id among the last WINDOW arrivals before this connection, if that one has the same
  digest; otherwise it is new. Why: copies are acked in order and at most RECEIVE_MAXIMUM are
  stored-but-unacked at a time, so an unacked copy is among the newest arrivals, and a broker
  does not reuse a packet id until it is acked (Mosquitto counts ids up, so an earlier holder of
  the id is 65535 copies back). Copies without DUP are never merged: identical payloads
  published again stay separate events. Limits: a broker that reuses a freed packet id at once
  could make a copy that crashed before its commit look like a redelivery of an identical copy
  acked just before under that id; a copy left unacked through more than about
  WINDOW / (2 * RECEIVE_MAXIMUM) consecutive failed connections is stored twice.

Event shapes (`event_format`): "mqtt" (the default) wraps the payload with the topic, QoS and
flags (`_event`). "iot" is what an AWS IoT rule's Lambda action delivers, so handlers ported
from IoT run unchanged (`iot_event`): a JSON object payload is the event itself (`SELECT *`),
and `topic_field` adds the topic under that name (the rule's `SELECT *, topic() AS topic`).
Anything else (other JSON, text, binary) is wrapped as `{"data": "<base64>"}`, which is what
IoT's documented `SELECT encode(*, 'base64') AS data` gives, rather than rejected: the "mqtt"
shape also delivers every payload, and only JSON nested too deep for the worker is rejected.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import quote

import aiomqtt
import msgspec
import structlog
from msgspec import Meta
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.backoff import Backoff
from daemon.credentials import mqtt_connection
from daemon.errors import ConfigError, EventRejectedError, StoreUnavailableError
from daemon.metrics import Sample
from daemon.untrusted import MAX_JSON_DEPTH, json_too_deep
from triggers.base import Accepted, BatchedTriggerSettings, Emit, Inputs, Placed, emit_built

if TYPE_CHECKING:
    from daemon.config import Config

log = structlog.get_logger("lambdaemon.triggers.mqtt")

RECEIVE_MAXIMUM = 128  # copies in flight to us, announced to the broker and enforced here too
WINDOW = 4096  # arrivals searched for a first delivery: far below the 65535 packet ids
BACKOFF_S = (0.5, 30.0)  # reconnect delay: first, cap (jittered)
# A connection the broker ends sooner than this after its CONNACK is short; SHORT_IN_A_ROW short
# ones in a row look like a client id in use twice (MqttSource._contested). Longer than the
# backoff's cap, so a contest that has slowed down to the cap still counts.
SHORT_S = 2 * BACKOFF_S[1]
SHORT_IN_A_ROW = 3
DEAD_CHECK_S = 2.0  # how often a fleet's first live node looks for dead nodes to drain
DRAIN_QUIET_S = 1.0  # MqttSource.drain: a session is drained once this long passes quietly
ROUTES_KEPT = 4096  # topics whose triggers are remembered (_route)
SHARE = "$share/"  # a shared subscription's filter: $share/<group>/<topic filter>
MESSAGE_ID = "message-id"  # user property a publisher may set as the event's idempotency key
_json = msgspec.json.Encoder()


class MqttTriggerConfig(BatchedTriggerSettings, tag="mqtt", frozen=True):
    topic: Annotated[str, Meta(min_length=1)]
    qos: Literal[0, 1] = 1
    event_format: Literal["mqtt", "iot"] = "mqtt"
    topic_field: Annotated[str, Meta(min_length=1)] | None = None  # "iot": the topic's key

    def check(self, config: Config, key: str) -> None:
        super().check(config, key)
        if self.topic_field is not None and self.event_format != "iot":
            reason = 'only an event_format = "iot" trigger takes a topic_field'
            raise ConfigError(config.path, f"{key}.topic_field", reason)
        if config.mqtt is None:
            raise ConfigError(config.path, key, "an mqtt trigger needs an [mqtt] section")
        if not valid_topic_filter(self.topic):
            reason = f"{self.topic!r} is not a valid MQTT topic filter"
            raise ConfigError(config.path, f"{key}.topic", reason)
        if config.mqtt.share_group is not None and self.topic.startswith(SHARE):
            reason = (
                f"{self.topic!r} is a shared subscription already, and [mqtt] share_group"
                f" = {config.mqtt.share_group!r} would share it again: give the plain topic"
            )
            raise ConfigError(config.path, f"{key}.topic", reason)


def valid_topic_filter(topic: str) -> bool:
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return "\0" not in topic


class _NotStoredError(Exception):
    """A message's commit failed; it was not acked and the broker will redeliver it."""


class _Client(aiomqtt.Client):
    """aiomqtt's client, keeping what 2.5.1 drops: the DUP flag and the CONNACK details."""

    session_present = False
    subscription_ids = True

    async def __aenter__(self) -> _Client:
        # Copies left from the previous connection: their packet ids mean nothing on the next
        # one (the broker redelivers them), so acking them there would ack something else.
        while not self._queue.empty():
            self._queue.get_nowait()
        if self._connected.done() and not self._lock.locked():
            # 2.5.1 leaves this set after a dropped connection, so the next enter would not
            # wait for the CONNACK (or notice a refusal).
            self._connected = asyncio.get_running_loop().create_future()
        return await super().__aenter__()

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        if not self._connected.done():
            self.session_present = bool(flags.session_present)
            self.subscription_ids = getattr(properties, "SubscriptionIdentifierAvailable", 1) != 0
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        msg = aiomqtt.Message._from_paho_message(message)
        msg.dup = bool(message.dup)  # type: ignore[attr-defined]
        self._queue.put_nowait(msg)  # unbounded on purpose: a full queue would drop silently


@dataclass(frozen=True)
class _Subscription:
    topic: str  # the trigger's filter, which a message's topic is matched against
    filter: str  # what is subscribed: the topic, or $share/<share_group>/<topic>
    qos: int
    id: int  # v5 subscription identifier, stable for a given filter
    targets: tuple[tuple[str, str], ...]  # (function, trigger id)


class _Window:
    """One connection's copies in arrival order; each is acked once it and all before are stored."""

    def __init__(self, paho: Any, seq_at_connect: int) -> None:
        self._paho = paho
        self._entries: deque[tuple[aiomqtt.Message, asyncio.Task[None]]] = deque()
        # Stored copies whose PUBACK goes out at the end of this loop turn, in one write with
        # the others stored in the same group commit (_flush), and the copies they count.
        self._acks: list[int] = []
        self._stored = 0
        self._flushing = False
        # Taken per copy, given back at its PUBACK. Mosquitto 2.0 ignores Receive Maximum when
        # it resumes a session (it sends the whole offline backlog at once), so the bound on
        # stored-but-unacked copies, which the redelivery rule relies on, is kept here.
        self.slots = asyncio.Semaphore(RECEIVE_MAXIMUM)
        self.seq_at_connect = seq_at_connect
        self.recent: asyncio.Future[dict[int, tuple[int, str]]] | None = None  # see _recent
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self.open = True  # cleared when the connection ends: a packet id means nothing after that
        self.taken = 0  # copies received on this connection

    def add(self, msg: aiomqtt.Message, task: asyncio.Task[None]) -> None:
        self._entries.append((msg, task))
        self.taken += 1
        task.add_done_callback(self._advance)

    async def quiet(self, quiet_s: float) -> None:
        """Return once nothing is in flight and nothing arrived for `quiet_s` (MqttSource.drain)."""
        seen = -1
        while True:
            await asyncio.sleep(quiet_s)
            if self.taken == seen and not self._entries and not self._acks:
                return
            seen = self.taken

    def _advance(self, _: asyncio.Task[None]) -> None:
        while self.open and self._entries and self._entries[0][1].done():
            msg, task = self._entries.popleft()
            error = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if error is not None:
                self._flush()  # those before it are stored: acked
                self.open = False  # nothing after it may be acked either (in-order PUBACK)
                self.failure = error
                self.failed.set()
                return
            if msg.qos == 1:
                self._acks.append(msg.mid)
            self._stored += 1
            if not self._flushing:
                self._flushing = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send the PUBACKs gathered in this loop turn, then free their copies' slots."""
        self._flushing = False
        if not self.open:  # the connection ended: the broker redelivers them
            self._acks.clear()
            return
        if self._acks:
            puback(self._paho, self._acks)
            self._acks = []
        for _ in range(self._stored):
            self.slots.release()
        self._stored = 0

    async def settle(self, *, cancel: bool) -> None:
        """Let every copy's commit finish (or cancel it; a queued commit still lands)."""
        self._flush()
        self.open = False
        tasks = [task for _, task in self._entries]
        for task in tasks if cancel else ():
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MqttSource:
    """Serves every `mqtt` trigger over one persistent-session client (see the module doc)."""

    name = "mqtt"
    settings = MqttTriggerConfig

    def __init__(self, config: Config, store: Any, triggers: list[tuple[str, str, Any]]) -> None:
        if config.mqtt is None:
            raise ConfigError(config.path, "mqtt", "an mqtt trigger needs an [mqtt] section")
        self._settings = settings = config.mqtt
        self._config, self._triggers = config, triggers  # for drain()
        self._store = store
        self._emit: Emit | None = None  # run()'s, for drain()
        self._host, self._port, self._tls, self._password = mqtt_connection(config)
        self._subscriptions = _subscriptions(triggers, settings.share_group)
        self._shapes: dict[str, _Shape] = {
            tid: (cfg.event_format, cfg.topic_field) for _, tid, cfg in triggers
        }
        self._by_id = {s.id: s for s in self._subscriptions}
        # (topic, subscription ids) -> targets: matching a topic against the filters costs more
        # than the rest of routing, and devices publish to the same few topics again and again.
        self._routes: dict[tuple[str, tuple[int, ...] | None], list[tuple[str, str]]] = {}
        # Arrival numbers belong to one session (one client id). A publisher's message-id is
        # the fleet's: with share_group, the node a redelivery goes to may not be the first
        # one, and on a shared store it finds the first one's record under the group's prefix.
        session = settings.client_id
        scope = session if settings.share_group is None else SHARE + settings.share_group
        self._id_prefix = f"mqtt:{quote(scope, safe='')}:id:"
        self._seq_prefix = f"mqtt:{quote(session, safe='')}:seq:"
        self._seq = 0  # the last arrival number handed out
        self._store_trouble = False
        self._connected = False  # subscribed on a live connection, for GET /metrics
        # Set once the first connection is subscribed, or has failed (it is retried in the
        # background): the daemon reports ready after that, never waiting on a broker.
        self.started = asyncio.Event()

    @staticmethod
    def inputs(config: Config, triggers: list[Placed], secrets: Mapping[str, str]) -> Inputs:
        files = (secrets.get("mqtt.password_file"), secrets.get("mqtt.ca_file"))
        return Inputs(restart=(triggers, config.mqtt, files))

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        drainer = None
        if self._drains_dead_nodes():
            drainer = asyncio.create_task(self._drain_dead_nodes(), name="mqtt:drain-dead")
        try:
            await self._serve(emit)
        finally:
            if drainer is not None:
                drainer.cancel()
                await asyncio.gather(drainer, return_exceptions=True)

    def _drains_dead_nodes(self) -> bool:
        """In a fleet on one store with share_group and default client ids: the client id of
        every node is known from its node id, so the nodes can drain a dead one's session."""
        default = f"lambdaemon-{self._config.node_id}"
        fleet = bool(getattr(self._store, "fleet", False))
        return (
            fleet and self._settings.share_group is not None and self._settings.client_id == default
        )

    async def _drain_dead_nodes(self) -> None:
        """Drain the session of each node whose lease ran out, once per run of that node.

        One node drains at a time: the live node first by node id (each node sees the same
        leases, on the database's clock). A node that comes back takes its session back (the
        drain then ends; what it stored is found by the node's own keys on the shared store)."""
        mine = self._config.node_id
        drained: set[tuple[str, float]] = set()
        while True:
            await asyncio.sleep(DEAD_CHECK_S)
            try:
                now, nodes = await self._store.list_nodes()
            except StoreUnavailableError:
                continue  # the store's own health says so; tried again next time
            live = sorted(n["node_id"] for n in nodes if n["lease_until"] >= now)
            if not live or live[0] != mine:
                continue
            for node in nodes:
                key = (node["node_id"], node["started_at"])
                if node["lease_until"] >= now or key in drained:
                    continue
                client_id = f"lambdaemon-{node['node_id']}"
                try:
                    await self.drain(client_id)
                except (aiomqtt.MqttError, StoreUnavailableError) as exc:
                    log.warning("mqtt_drain_failed", client_id=client_id, error=str(exc))
                    continue
                drained.add(key)

    async def _serve(self, emit: Emit) -> None:
        client = self._client()
        self._seq = await self._last_seq()
        backoff = Backoff(*BACKOFF_S, jitter=(0.5, 1.0))
        # Connections in a row that the broker ended within SHORT_S of their CONNACK, with no
        # failed connect between them: how a client id used twice shows (see _contested).
        short = 0
        while True:
            connected_at: float | None = None
            taken_over = False
            try:
                async with client:
                    log.info(
                        "mqtt_connected",
                        host=self._host,
                        port=self._port,
                        client_id=self._settings.client_id,
                        session_present=client.session_present,
                    )
                    await self._subscribe(client)
                    self._connected = True
                    self.started.set()
                    connected_at = time.monotonic()
                    if not self._store_trouble and not short:
                        backoff.reset()
                    await self._consume(client, emit)
                reason = "stopped"
            except aiomqtt.MqttError as exc:
                reason = str(exc) + (f": {exc.__cause__}" if exc.__cause__ else "")
                taken_over = _taken_over(exc)
                if connected_at is None:
                    short = 0  # the broker refused or was away: not a session taken over
                elif taken_over or time.monotonic() - connected_at < SHORT_S:
                    short += 1
                else:
                    short = 0
                    backoff.reset()
            except _NotStoredError as exc:
                reason, self._store_trouble = str(exc), True
            self._connected = False
            self.started.set()
            wait = backoff.next()
            if taken_over or short >= SHORT_IN_A_ROW:
                self._contested(taken_over, short, wait)
            else:
                log.warning("mqtt_disconnected", reason=reason, retry_in_s=round(wait, 2))
            await asyncio.sleep(wait)

    def _contested(self, taken_over: bool, short: int, wait: float) -> None:
        """Say that another client seems to use our client id; the wait grows meanwhile.

        Two daemons with one client id take the session from each other for ever, each
        connect ending the other's connection. A v5 broker may say so (reason 0x8E, "session
        taken over"); Mosquitto 2.0 closes the older connection without a word. So the sign is
        also a run of connections the broker ends soon after accepting them, which a broker
        restart does not make (its connects are refused until it is back). Either way the
        backoff is not reset at each connect, so the fight slows down to one round per cap."""
        client_id = self._settings.client_id
        if taken_over:
            why = "the broker ended the connection with reason 0x8E (session taken over)"
        else:
            why = (
                f"the broker ended {short} connections in a row within {SHORT_S:.0f} s of"
                " accepting them, without a reason (Mosquitto does that when another client"
                " connects with the same client id)"
            )
        log.error(
            "mqtt_session_taken_over",
            client_id=client_id,
            reason=f"{why}: is another daemon using client id {client_id!r} on"
            f" {self._host}:{self._port}? give each its own [mqtt] client_id (unset with"
            " share_group: one per node)",
            retry_in_s=round(wait, 2),
        )

    async def drain(self, client_id: str, quiet_s: float = DRAIN_QUIET_S) -> dict[str, Any]:
        """Take over another client id's session, store and ack what the broker holds for it.

        For a node of the share group that will not come back: Mosquitto keeps its unacked
        messages and its turns for its session until the session expires. This connects once
        with that client id (its session, Clean Start 0), unsubscribes this node's filters
        first (what the session holds still comes; nothing new is queued for it from then on),
        commits and acks as run() does, with the de-duplication keys of that client id, and
        disconnects once nothing is in flight and nothing arrived for `quiet_s`. The session is
        left to expire (unsubscribed, it gathers nothing): what arrives later, if anything,
        waits there for another drain or the node's return."""
        if self._emit is None:
            raise RuntimeError("the MQTT source is not running yet")
        if client_id == self._settings.client_id:
            raise ValueError(f"{client_id!r} is this daemon's own client id")
        settings = msgspec.structs.replace(self._settings, client_id=client_id)
        other = MqttSource(
            msgspec.structs.replace(self._config, mqtt=settings), self._store, self._triggers
        )
        other._seq = await other._last_seq()
        client = other._client()
        log.info("mqtt_drain_started", client_id=client_id, host=self._host, port=self._port)
        async with client:
            if other._subscriptions:
                await client.unsubscribe([sub.filter for sub in other._subscriptions])
            try:
                stored = await other._consume(client, self._emit, quiet_s=quiet_s)
            except _NotStoredError as exc:
                raise StoreUnavailableError(f"{exc}; nothing more was acknowledged") from exc
        report = {"client_id": client_id, "session_present": client.session_present}
        report["messages"] = stored
        log.info("mqtt_drained", **report)
        return report

    def samples(self) -> list[Sample]:
        return [Sample("lambdaemon_mqtt_connected", {}, float(self._connected))]

    def _client(self) -> _Client:
        s = self._settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        client = _Client(
            self._host,
            self._port,
            identifier=s.client_id,
            username=s.username,
            password=self._password,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            keepalive=s.keepalive_s,
            tls_context=self._tls,
        )
        # Before the first CONNECT: a resumed session's backlog follows the CONNACK at once,
        # and paho would ack it on receipt.
        client._client.manual_ack_set(True)
        return client

    async def _subscribe(self, client: _Client) -> None:
        for sub in self._subscriptions:
            props = None
            if client.subscription_ids:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub.id
            options = SubscribeOptions(qos=sub.qos, retainHandling=1)
            (granted,) = await client.subscribe(sub.filter, options=options, properties=props)
            code = granted.value if isinstance(granted, ReasonCode) else granted
            if code >= 0x80:  # refused, e.g. by the broker's ACL: that trigger stays silent
                log.error("mqtt_subscribe_failed", topic=sub.filter, reason=str(granted))
            else:
                log.info("mqtt_subscribed", topic=sub.filter, qos=code)

    async def _consume(self, client: _Client, emit: Emit, quiet_s: float | None = None) -> int:
        """Take the connection's messages until it ends (an error), or with `quiet_s` until
        nothing is in flight and nothing arrived for that long; return how many were stored."""
        window = _Window(client._client, self._seq)
        receiver = asyncio.create_task(self._receive(client, emit, window))
        failed = asyncio.create_task(window.failed.wait())
        ends = {receiver, failed}
        if quiet_s is not None:
            ends.add(asyncio.create_task(window.quiet(quiet_s)))
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            receiver.cancel()
            await window.settle(cancel=True)
            raise
        finally:
            for end in ends - {receiver}:
                end.cancel()
        receiver.cancel()
        await asyncio.wait({receiver})
        # Every first delivery is committed (or failed) before a redelivery can be looked up.
        await window.settle(cancel=False)
        if window.failure is not None:
            raise _NotStoredError(f"not stored: {window.failure!r}") from window.failure
        if not receiver.cancelled():
            receiver.result()  # the MqttError that ended the connection
        return window.taken

    async def _receive(self, client: _Client, emit: Emit, window: _Window) -> None:
        # Not through aiomqtt's iterator, which makes a task and runs asyncio.wait() for every
        # message to notice a lost connection, and cost more than the rest of taking a message
        # in: the loss puts a marker behind the messages in the queue (the next connection's
        # __aenter__ empties it), and the queue is awaited as it is.
        queue, disconnected = client._queue, client._disconnected
        mark = functools.partial(_queue_marker, queue)
        disconnected.add_done_callback(mark)
        try:
            while True:
                msg = queue.get_nowait() if not queue.empty() else await queue.get()
                if msg is _GONE:
                    cause = None if disconnected.cancelled() else disconnected.exception()
                    raise aiomqtt.MqttError("Disconnected during message iteration") from cause
                await window.slots.acquire()
                targets = self._route(msg, client.subscription_ids)
                window.add(msg, asyncio.create_task(self._accept(emit, msg, targets, window)))
        finally:
            disconnected.remove_done_callback(mark)

    def _route(self, msg: aiomqtt.Message, by_id: bool) -> list[tuple[str, str]]:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if by_id else None
        key = (msg.topic.value, tuple(ids) if ids else None)
        targets = self._routes.get(key)
        if targets is None:
            # Without identifiers, every filter is tried: a copy per overlapping subscription
            # would then run a trigger twice, which beats dropping a message the broker failed
            # to label.
            subs = [self._by_id[i] for i in ids if i in self._by_id] if ids else self._subscriptions
            # The topic check also guards against a lingering subscription of an older config.
            targets = [t for s in subs if msg.topic.matches(s.topic) for t in s.targets]
            if len(self._routes) >= ROUTES_KEPT:  # topics can be many: a bound, not an LRU
                self._routes.clear()
            self._routes[key] = targets
        return targets

    async def _accept(
        self, emit: Emit, msg: aiomqtt.Message, targets: list[tuple[str, str]], window: _Window
    ) -> None:
        if not targets:
            log.warning("mqtt_message_rejected", topic=msg.topic.value, reason="no trigger matches")
            return
        keys = await self._dedupe_keys(msg, targets, window)
        # Built once per event shape for all targets; a message that cannot become an event is
        # recorded as rejected and acked like any other, so it never holds up those behind it.
        built: dict[_Shape, _Built] = {}

        def accept(fn: str, tid: str) -> Awaitable[Accepted]:
            shape = self._shapes.get(tid, _MQTT_SHAPE)
            build = built.get(shape)
            if build is None:
                built[shape] = build = _Built(msg, shape)
            return emit_built(
                emit,
                fn,
                build,
                raw=lambda: _payload(msg),
                trigger="mqtt",
                trigger_id=tid,
                dedupe_key=keys[tid],
                details=lambda: {"topic": msg.topic.value, "qos": msg.qos},
            )

        results: list[Any]
        if len(targets) == 1:  # the usual case: no task per target
            ((fn, tid),) = targets
            try:
                results = [await accept(fn, tid)]
            except Exception as exc:
                results = [exc]
        else:
            results = await asyncio.gather(
                *(accept(fn, tid) for fn, tid in targets), return_exceptions=True
            )
        for (fn, tid), result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "mqtt_message_not_stored",
                    topic=msg.topic.value,
                    function=fn,
                    qos=msg.qos,
                    error=repr(result),
                )
                raise result
            if not result.created:
                log.info(
                    "mqtt_redelivery_matched",
                    topic=msg.topic.value,
                    trigger_id=tid,
                    invocation_id=result.invocation_id,
                )
        self._store_trouble = False

    async def _dedupe_keys(
        self, msg: aiomqtt.Message, targets: list[tuple[str, str]], window: _Window
    ) -> dict[str, str | None]:
        if msg.qos == 0:
            return {tid: None for _, tid in targets}  # never redelivered
        user = dict(getattr(msg.properties, "UserProperty", None) or ())
        if MESSAGE_ID in user:
            base = self._id_prefix + _digest(msg.topic.value.encode(), user[MESSAGE_ID].encode())
        else:
            digest = _digest(msg.topic.value.encode(), msg.payload)
            seq = None
            if msg.dup:  # type: ignore[attr-defined]
                if window.recent is None:  # one read per connection, by its first DUP copy
                    window.recent = asyncio.ensure_future(self._recent(window.seq_at_connect))
                    window.recent.add_done_callback(_retrieve)
                first = (await asyncio.shield(window.recent)).get(msg.mid)
                seq = first[0] if first is not None and first[1] == digest else None
            if seq is None:
                self._seq = seq = self._seq + 1
            base = f"{self._seq_prefix}{seq:012d}:{msg.mid}:{digest}"
        return {tid: f"{base}:{tid}" for _, tid in targets}

    async def _recent(self, seq_at_connect: int) -> dict[int, tuple[int, str]]:
        """Packet id -> (arrival, digest) of its newest arrival among the last WINDOW ones."""
        low = max(seq_at_connect - WINDOW, 0) + 1
        keys = await self._store.dedupe_keys_in(
            f"{self._seq_prefix}{low:012d}", f"{self._seq_prefix}{seq_at_connect + 1:012d}"
        )
        recent: dict[int, tuple[int, str]] = {}
        for key in keys:  # in key order, so in arrival order: the newest one wins
            seq, mid, digest = key[len(self._seq_prefix) :].split(":", 3)[:3]
            recent[int(mid)] = (int(seq), digest)
        return recent

    async def _last_seq(self) -> int:
        # ';' sorts right after ':', so the range is exactly the keys under the prefix.
        last = await self._store.last_dedupe_key_in(self._seq_prefix, self._seq_prefix[:-1] + ";")
        return int(last[len(self._seq_prefix) :].split(":", 1)[0]) if last else 0


def puback(paho: Any, mids: list[int]) -> None:
    """PUBACK (MQTT v5, success, no properties) each of `mids`, in order, in one write.

    paho's ack() queues one packet per message, and each queued packet costs a write to its
    wake-up socket pair besides its own send(). Here the acks go into paho's queue as one
    packet: paho sends a queued packet's bytes as they are, and looks at what they are only
    for a PUBLISH or a DISCONNECT (tests/test_reliances.py)."""
    if len(mids) == 1:
        paho.ack(mids[0], 1)
        return
    packet = b"".join(_PUBACK.pack(_PUBACK_TYPE, 2, mid) for mid in mids)
    paho._packet_queue(_PUBACK_TYPE, packet, 0, 1)


_PUBACK = struct.Struct("!BBH")
_PUBACK_TYPE = 0x40


# paho's tables of properties, the same for every instance (_PublishProperties).
_TABLES = Properties(PacketTypes.PUBLISH)
_SHARED = {"types": _TABLES.types, "names": _TABLES.names, "properties": _TABLES.properties}
_IDENTS = {name.replace(" ", ""): ident for name, ident in _TABLES.names.items()}
_NAMES = {ident: name for name, ident in _TABLES.names.items()}
_MULTIPLE = frozenset(name for name in _IDENTS if _TABLES.allowsMultiple(name))


class _PublishProperties(Properties):
    """paho's Properties for a received PUBLISH, with its tables made once, not per message.

    paho builds its tables of property names, identifiers and types in every instance's
    __init__ and finds a name by scanning them: decoding a v5 PUBLISH whose one property is
    our subscription identifier took 33 us, some 15% of the loop's time per message (3.1.1,
    without properties: 2 us). Here __init__ shares tables made once, a fresh instance has
    nothing to clear, and the lookups are dicts; the parsing, the checks and the values are
    paho's own. Installed as the class paho.mqtt._packet.decode_publish builds (paho-mqtt is
    pinned for it; tests/test_reliances.py compares both on every PUBLISH property).
    """

    def __init__(self, packetType: int) -> None:
        self.__dict__.update(_SHARED, packetType=packetType)

    def clear(self) -> None:
        if len(self.__dict__) > len(_SHARED) + 1:  # holds a property
            super().clear()  # type: ignore[no-untyped-call]

    def getIdentFromName(self, compressedName: str) -> int:  # noqa: N802, N803 (paho's names)
        return _IDENTS.get(compressedName, -1)

    def getNameFromIdent(self, identifier: int) -> str | None:  # noqa: N802 (paho's name)
        return _NAMES.get(identifier)

    def allowsMultiple(self, compressedName: str) -> bool:  # noqa: N802, N803 (paho's names)
        return compressedName in _MULTIPLE


if _packet.Properties is Properties:  # type: ignore[attr-defined]
    _packet.Properties = _PublishProperties  # type: ignore[attr-defined]


def _subscriptions(
    triggers: list[tuple[str, str, Any]], share_group: str | None
) -> list[_Subscription]:
    by_topic: dict[str, list[tuple[str, str, MqttTriggerConfig]]] = {}
    for fn, tid, trigger in triggers:
        by_topic.setdefault(trigger.topic, []).append((fn, tid, trigger))
    subs, used = [], set()
    for topic in sorted(by_topic):
        # A message through a shared subscription carries its own topic, not the $share filter,
        # and the subscription's identifier: the id is the filter's, so a subscription of
        # another form left in the session by an older config is told apart (_route).
        filter_ = f"{SHARE}{share_group}/{topic}" if share_group is not None else topic
        sub_id = zlib.crc32(filter_.encode()) % 0x0FFFFFFF + 1
        while sub_id in used:  # deterministic for a given config
            sub_id = sub_id % 0x0FFFFFFF + 1
        used.add(sub_id)
        group = by_topic[topic]
        qos = max(t.qos for _, _, t in group)
        targets = tuple((fn, tid) for fn, tid, _ in group)
        subs.append(_Subscription(topic, filter_, qos, sub_id, targets))
    return subs


SESSION_TAKEN_OVER = 0x8E  # MQTT v5 DISCONNECT reason: a client connected with our client id


def _taken_over(exc: BaseException) -> bool:
    """Whether the broker ended the connection because another one took the session."""
    cause: BaseException | None = exc
    while cause is not None:
        code = getattr(cause, "rc", None)
        if getattr(code, "value", code) == SESSION_TAKEN_OVER:
            return True
        cause = cause.__cause__
    return False


_GONE: Any = object()  # put in the message queue when the connection is lost (_receive)


def _queue_marker(queue: asyncio.Queue[Any], _: asyncio.Future[None]) -> None:
    queue.put_nowait(_GONE)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Its awaiters may all be gone (connection ended): no "exception never retrieved" noise.
    if not future.cancelled():
        future.exception()


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:32]


_Shape = tuple[str, str | None]  # (event_format, topic_field)
_MQTT_SHAPE: _Shape = ("mqtt", None)


class _Built:
    """A message's event in one shape, encoded on the first call and kept for the next.

    In place of functools.cache over a partial, whose wrapper costs more to make (per message)
    than the encoding it saves."""

    __slots__ = ("_msg", "_shape", "_raw")

    def __init__(self, msg: aiomqtt.Message, shape: _Shape) -> None:
        self._msg, self._shape = msg, shape
        self._raw: msgspec.Raw | None = None

    def __call__(self) -> msgspec.Raw:
        if self._raw is None:
            self._raw = _encoded(self._msg, self._shape)
        return self._raw


def _encoded(msg: aiomqtt.Message, shape: _Shape) -> msgspec.Raw:
    event_format, topic_field = shape
    event = iot_event(msg, topic_field) if event_format == "iot" else _event(msg)
    return msgspec.Raw(_json.encode(event))


def iot_event(msg: aiomqtt.Message, topic_field: str | None) -> dict[str, Any]:
    """What an AWS IoT rule hands Lambda: a JSON object payload as is (`SELECT *`), anything
    else as `{"data": base64}` (`SELECT encode(*, 'base64') AS data`); plus the topic under
    `topic_field` when set (`topic() AS <topic_field>`, which wins over a payload key)."""
    payload = _payload(msg)
    if json_too_deep(payload):
        raise EventRejectedError(f"payload JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        decoded = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        decoded = None
    event = decoded if isinstance(decoded, dict) else {"data": base64.b64encode(payload).decode()}
    if topic_field is not None:
        event[topic_field] = msg.topic.value
    return event


def _event(msg: aiomqtt.Message) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event: dict[str, Any] = {
        "topic": msg.topic.value,
        "qos": msg.qos,
        "retain": bool(msg.retain),
        "dup": msg.dup,  # type: ignore[attr-defined]
        "received_at": now,
    }
    payload = _payload(msg)
    if json_too_deep(payload):
        raise EventRejectedError(f"payload JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        event["payload"] = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        try:
            event["payload"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            event["payload"] = base64.b64encode(payload).decode("ascii")
            event["payload_encoding"] = "base64"
    properties = _properties(msg.properties)
    if properties:
        event["properties"] = properties
    return event


def _payload(msg: aiomqtt.Message) -> bytes:
    return bytes(msg.payload) if not isinstance(msg.payload, bytes) else msg.payload


def _properties(props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if user := getattr(props, "UserProperty", None):
        out["user"] = dict(user)
    for attr, key in (("ContentType", "content_type"), ("ResponseTopic", "response_topic")):
        if (value := getattr(props, attr, None)) is not None:
            out[key] = value
    if (data := getattr(props, "CorrelationData", None)) is not None:
        out["correlation_data"] = base64.b64encode(data).decode("ascii")
    return out
