"""Mutated input at the real daemon (tests/fuzz.py): both HTTP listeners, an MQTT topic it
subscribes to, and a folder it watches.

Whatever arrives, the daemon answers each request with no 5xx of its own (a sync webhook may
say 502/504 for its handler), ends every connection within its limits, logs nothing at error
level and no traceback, keeps its memory bounded, records every message and file, and serves a
normal request, message and file afterwards. Seed and budget: see tests/fuzz.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import random
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
import pytest_asyncio

from tests.daemon_proc import Daemon, free_port, write_config
from tests.fuzz import Mutator, Request, RequestFuzzer, about, budget_s, replies, seed, stream
from tests.mosquitto import Mosquitto
from tests.waits import until_changed
from triggers.files import IGNORED_SUFFIXES

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(budget_s() + 120),  # an hour's run by hand must not hit the default
]

FUNCS = Path(__file__).resolve().parent / "functions"
HOOKS = Path(__file__).resolve().parent / "triggers" / "functions"
SECRET, TOKEN, PASSWORD = "fuzz-hmac-secret", "fuzz-token", "fuzz-pässword"
LIMIT_S = 1  # the listeners' head, body and keep-alive timeouts in this config
# A connection the daemon has neither answered and closed nor timed out by now hangs: its
# limits, one sweep, and room for a sync call queued behind others on a loaded 2-core box.
HANG_S = 3 * LIMIT_S + 10
CLIENTS = 16  # connections at once, each with its own input stream
MAX_RSS_MB = 200
BACKLOG = 8  # files dropped ahead of the daemon: the folder is fuzzed, not flooded
AHEAD = 32  # messages published ahead of the daemon: likewise (benchmarks/ measure floods)
WEBHOOK_HANDLER_FAILED = frozenset({502, 504})  # the handler's outcome, not the daemon's


def config_body(webhook_port: int, broker_url: str, inbox: Path) -> str:
    limits = f"head_timeout_s = {LIMIT_S}\nbody_timeout_s = {LIMIT_S}\nkeepalive_s = {LIMIT_S}\n"
    hooks = [
        '{ type = "webhook", path = "/open", methods = ["GET", "POST", "PUT"] }',
        '{ type = "webhook", path = "/async", mode = "async" }',
        '{ type = "webhook", path = "/token", auth = { type = "token", token_file = "token" } }',
        '{ type = "webhook", path = "/basic", auth = { type = "basic", username = "u", '
        'password_file = "password" } }',
        '{ type = "webhook", path = "/signed", auth = { type = "hmac", secret_file = "secret" } }',
        '{ type = "webhook", path = "/stamped", mode = "async", auth = { type = "hmac", '
        'secret_file = "secret", header = "X-Signature", timestamp_header = "X-Timestamp" } }',
        '{ type = "webhook", path = "/app/{proxy+}", cors = { allow_origins = ["https://o.example"], '
        "allow_credentials = true } }",
        '{ type = "webhook", path = "/rest/*", payload_format = "1.0" }',
    ]
    busy = "concurrency = 2\nqueue_size = 1000\n"
    return f"""{limits}
[webhooks]
listen = "127.0.0.1:{webhook_port}"
max_body_bytes = 65536
{limits}
[mqtt]
url = "{broker_url}"
client_id = "lambdaemon-fuzz"

[functions.echo]
handler = "handler.handler"
code = "{FUNCS / "echo"}"
{busy}
[functions.mirror]
handler = "handler.handler"
code = "{HOOKS / "webhook_mirror"}"
{busy}triggers = [{", ".join(hooks)}]

[functions.record]
handler = "handler.handler"
code = "{HOOKS / "mqtt_record"}"
{busy}triggers = [{{ type = "mqtt", topic = "fuzz/+/in", qos = 1 }}]

[functions.reader]
handler = "handler.handler"
code = "{HOOKS / "files_read"}"
{busy}triggers = [{{ type = "files", path = "{inbox}", rescan_s = 1.0 }}]
"""


@dataclass
class Target:
    daemon: Daemon
    broker: Mosquitto
    webhook_port: int
    inbox: Path


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    for name, secret in (("secret", SECRET), ("token", TOKEN), ("password", PASSWORD)):
        (tmp / name).write_text(secret + "\n")
    broker = Mosquitto(tmp / "broker")
    broker.start()
    port, inbox = free_port(), tmp / "inbox"
    daemon = Daemon(write_config(tmp, config_body(port, broker.url, inbox)))
    try:
        await daemon.start()
        await daemon.wait_log("webhook_listening")
        await daemon.wait_log("mqtt_subscribed")
        yield Target(daemon, broker, port, inbox)
    finally:
        await daemon.close()
        broker.close()


# --- what every target checks ------------------------------------------------------------------


def rss_mb(daemon: Daemon) -> float:
    assert daemon.proc is not None
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@contextlib.asynccontextmanager
async def rss_peak(daemon: Daemon) -> AsyncIterator[list[float]]:
    """The daemon's peak resident memory while the block runs (sampled: nothing announces it)."""
    peak = [rss_mb(daemon)]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb(daemon))
            await asyncio.sleep(0.2)  # a sampling period, not synchronisation

    sampler = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        peak[0] = max(peak[0], rss_mb(daemon))


@dataclass
class Checkpoint:
    """Where the daemon's log stood before a round of fuzzing."""

    daemon: Daemon
    events: int = 0
    offset: int = 0

    @classmethod
    def now(cls, daemon: Daemon) -> Checkpoint:
        return cls(daemon, daemon.log_mark(), daemon.log_path.stat().st_size)

    def errors(self) -> list[str]:
        """Lines logged since at error level or above, and any traceback, as text."""
        levels = ("error", "critical")
        found = [
            json.dumps(e)[:800]
            for e in self.daemon.log_events()[self.events :]
            if e.get("level") in levels
        ]
        with self.daemon.log_path.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        found += [line[:800] for line in text.splitlines() if "Traceback" in line]
        return found


async def assert_unharmed(target: Target, mark: Checkpoint, peak_mb: float, run_seed: int) -> None:
    where = f"(LAMBDAEMON_FUZZ_SEED={run_seed})"
    assert mark.errors() == [], f"errors logged {where}"
    assert peak_mb < MAX_RSS_MB, f"daemon RSS reached {peak_mb:.0f} MB {where}"
    health = await target.daemon.get("/health")
    assert health["status"] == "ok", f"/health after fuzzing: {health} {where}"


# --- HTTP --------------------------------------------------------------------------------------


@dataclass
class Findings:
    run_seed: int
    problems: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    connections: int = 0

    def summary(self) -> str:
        counts = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return f"{self.connections} connections; answers {counts}"

    def report(self) -> str:
        shown = "\n".join(self.problems[:5])
        return f"{len(self.problems)} problems in {self.connections} connections:\n{shown}"


async def exchange(port: int, data: bytes, half_close: bool) -> bytes | None:
    """Send `data` on a new connection (then end our side, or not) and read until the daemon
    closes it: what it answered, or None when it did not close within HANG_S."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            if half_close:
                writer.write_eof()
            await writer.drain()

    sender = asyncio.create_task(send())  # read meanwhile: a daemon that answers may block us
    received = bytearray()
    try:
        async with asyncio.timeout(HANG_S):
            with contextlib.suppress(ConnectionError):
                while piece := await reader.read(65536):
                    received += piece
    except TimeoutError:
        return None
    finally:
        sender.cancel()
        writer.close()
    return bytes(received)


async def fuzz_listener(
    port: int, corpus: list[Request], name: str, allowed_5xx: frozenset[int]
) -> Findings:
    """CLIENTS connections at a time, each sending mutated requests, for the budget."""
    run_seed, deadline = seed(), time.monotonic() + budget_s()
    findings = Findings(run_seed)

    async def client(index: int) -> None:
        rng = stream(f"{name}:{index}", run_seed)
        fuzzer = RequestFuzzer(rng, corpus)
        while time.monotonic() < deadline:
            data, half_close = fuzzer.pick(), rng.random() < 0.95
            answer = await exchange(port, data, half_close)
            findings.connections += 1
            if answer is None:
                findings.problems.append(
                    f"no answer or close in {HANG_S} s: {about(run_seed, data)}"
                )
                continue
            statuses, rest = replies(answer)
            findings.statuses.update(statuses)
            bad = [s for s in statuses if s >= 500 and s not in allowed_5xx]
            if bad or rest:
                what = f"status {bad}" if bad else f"unframed bytes {rest[:200]!r}"
                findings.problems.append(f"{what} for {about(run_seed, data)}")

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return findings


def invoke(kind: str, body: bytes = b'{"a": 1}', **headers: str) -> Request:
    path = "/2015-03-31/functions/echo/invocations"
    return Request("POST", path, (("X-Amz-Invocation-Type", kind), *headers.items()), body)


def api_corpus() -> list[Request]:
    context = base64.b64encode(b'{"custom": {"k": "v"}, "env": {}}').decode()
    path = "/2015-03-31/functions/echo/invocations"
    return [
        invoke("RequestResponse"),
        invoke("RequestResponse", b'{"name": "\\u00fc", "list": [1, 2.5, null, true]}'),
        invoke("Event", b'{"n": 1}', **{"amz-sdk-invocation-id": str(uuid.uuid4())}),
        invoke("DryRun"),
        invoke("RequestResponse", b"[[[[[[1]]]]]]", **{"X-Amz-Client-Context": context}),
        invoke("RequestResponse", b'"text"', **{"X-Amz-Log-Type": "Tail"}),
        Request("POST", path + "?Qualifier=$LATEST", (("Content-Type", "application/json"),)),
        Request("POST", path, (("X-Amz-Invocation-Type", "Event"),), b'{"c": 1}', chunked=True),
        Request("POST", "/2015-03-31/functions/nope/invocations", body=b"{}"),
        Request("GET", "/health"),
        Request("GET", "/2015-03-31/functions/echo/configuration"),
        Request("GET", "/v1/invocations?limit=3&function=echo"),
        Request("GET", "/v1/functions"),
    ]


def hub_signature(body: bytes) -> list[tuple[str, str]]:
    mac = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return [("X-Hub-Signature-256", "sha256=" + mac)]


def stamped_signature(body: bytes) -> list[tuple[str, str]]:
    stamp = int(time.time())
    mac = hmac.new(SECRET.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return [("X-Timestamp", str(stamp)), ("X-Signature", "v0=" + mac)]


def webhook_corpus() -> list[Request]:
    basic = "Basic " + base64.b64encode(f"u:{PASSWORD}".encode()).decode()
    json_type = ("Content-Type", "application/json")
    form = ("Content-Type", "application/x-www-form-urlencoded")
    return [
        Request("POST", "/open?x=1&y=%C3%BC", (json_type,), b'{"event": [1, {"k": "v"}]}'),
        Request("GET", "/open?q=a+b", (("Cookie", "a=1; b=2"),)),
        Request("PUT", "/open", (form,), b"a=1&b=%FF&c"),
        Request("POST", "/open", (json_type,), b'{"chunked": true}', chunked=True),
        Request("POST", "/async", (json_type, ("Idempotency-Key", "k1")), b'{"async": 1}'),
        Request("POST", "/token", (("Authorization", f"Bearer {TOKEN}"),), b"plain text"),
        Request("POST", "/basic", (("Authorization", basic),), b"{}"),
        Request("POST", "/signed", (json_type,), b'{"signed": 1}', sign=hub_signature),
        Request("POST", "/stamped", (json_type,), b'{"stamped": 1}', sign=stamped_signature),
        Request("POST", "/stamped", (json_type,), b"{}", chunked=True, sign=stamped_signature),
        Request("DELETE", "/open"),
        Request("GET", "/app/items/7?q=a", (("Origin", "https://o.example"),)),
        Request(
            "OPTIONS",
            "/app/items/7",
            (("Origin", "https://o.example"), ("Access-Control-Request-Method", "PUT")),
        ),
        Request(
            "POST", "/rest/a/b%20c?x=1&x=2", (json_type, ("X-Multi", "1"), ("X-Multi", "2")), b"[1]"
        ),
        Request("POST", "/nowhere", body=b"x" * 100),
    ]


async def test_fuzz_api_listener(target: Target) -> None:
    mark = Checkpoint.now(target.daemon)
    async with rss_peak(target.daemon) as peak:
        findings = await fuzz_listener(target.daemon.api_port, api_corpus(), "api", frozenset())
    print(findings.summary())
    assert findings.problems == [], findings.report()
    assert findings.connections > CLIENTS
    await assert_unharmed(target, mark, peak[0], findings.run_seed)
    status, _, body = await target.daemon.invoke("echo", {"after": "fuzzing"})
    assert status == 200 and json.loads(body)["event"] == {"after": "fuzzing"}


async def test_fuzz_webhook_listener(target: Target) -> None:
    mark = Checkpoint.now(target.daemon)
    async with rss_peak(target.daemon) as peak:
        findings = await fuzz_listener(
            target.webhook_port, webhook_corpus(), "webhook", WEBHOOK_HANDLER_FAILED
        )
    print(findings.summary())
    assert findings.problems == [], findings.report()
    assert findings.connections > CLIENTS
    await assert_unharmed(target, mark, peak[0], findings.run_seed)
    corpus = {(r.target, r.chunked): r for r in webhook_corpus()}
    for key, ok in ((("/open?x=1&y=%C3%BC", False), 200), (("/signed", False), 200)):
        body = json.dumps({"after": "fuzzing", "nonce": uuid.uuid4().hex}).encode()
        answer = await exchange(target.webhook_port, corpus[key].render(body), True)
        assert answer is not None and replies(answer) == ([ok], b""), answer
    for key in (("/stamped", False), ("/stamped", True)):  # signed afresh: served
        body = json.dumps({"after": "fuzzing", "nonce": uuid.uuid4().hex}).encode()
        answer = await exchange(target.webhook_port, corpus[key].render(body), True)
        assert answer is not None and replies(answer) == ([202], b""), answer


# --- MQTT --------------------------------------------------------------------------------------


def stored_count(target: Target, trigger: str, like: str = "%") -> tuple[int, int]:
    """(rows of `trigger` whose event matches `like`, how many of them succeeded)."""
    db = target.daemon.config.parent / "var" / "lambdaemon.db"
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(status = 'succeeded'), 0) FROM invocations"
            " WHERE trigger = ? AND CAST(event AS TEXT) LIKE ?",
            (trigger, like),
        ).fetchone()
    finally:
        conn.close()
    return int(row[0]), int(row[1])


class Outcomes:
    """Ids of the invocations (of `function`) with one of `events` logged since `mark`; the
    log is read on from where the last look stopped."""

    def __init__(self, mark: Checkpoint, events: tuple[str, ...], function: str | None = None):
        self.daemon, self.events, self.function = mark.daemon, events, function
        self.at, self.ids = mark.events, set[str]()

    def __len__(self) -> int:
        lines = self.daemon.log_events()
        self.ids.update(
            e["invocation_id"]
            for e in lines[self.at :]
            if e.get("event") in self.events and self.function in (None, e.get("function"))
        )
        self.at = len(lines)
        return len(self.ids)


def mqtt_corpus() -> list[bytes]:
    return [
        b'{"temp": 21.5, "unit": "C", "tags": ["a", "b"], "ok": true, "none": null}',
        b"[" * 600 + b"]" * 600,  # past the depth bound: rejected
        b"[" * 500 + b"]" * 500,
        b"\x00\x01\x02\xff\xfe binary \x80",
        b"plain text, caf\xc3\xa9",
        b"",
        b'{"big": "' + b"x" * (512 * 1024) + b'"}',
        b"12345",
    ]


TOPIC_LEVELS = (b"sensor", b"caf\xc3\xa9", b"", b"a b", b"%00")


def mqtt_topic(mutator: Mutator) -> str:
    """A topic the daemon subscribes to (fuzz/+/in) with a mutated middle level: Mosquitto
    takes only UTF-8 without control characters or wildcards, and a level has no '/'."""
    level = mutator.pick()[:64]
    text = level.decode("utf-8", "replace")
    return (
        "fuzz/" + "".join(c for c in text if c.isprintable() and c not in "/+#\ufffe\uffff") + "/in"
    )


async def test_fuzz_mqtt_topic(target: Target) -> None:
    run_seed, deadline = seed(), time.monotonic() + budget_s()
    rng = stream("mqtt", run_seed)
    payloads, topics = Mutator(rng, mqtt_corpus()), Mutator(rng, TOPIC_LEVELS)
    mark, published = Checkpoint.now(target.daemon), 0
    handled = Outcomes(mark, ("invocation_finished", "event_rejected"), "record")
    v5 = aiomqtt.ProtocolVersion.V5
    async with rss_peak(target.daemon) as peak:
        async with aiomqtt.Client("127.0.0.1", target.broker.port, protocol=v5) as client:
            while time.monotonic() < deadline:
                await client.publish(mqtt_topic(topics), payloads.pick(), qos=1)
                published += 1
                if published - len(handled) >= AHEAD:
                    await target.daemon.wait_logged(
                        lambda sent=published: sent - len(handled) < AHEAD,
                        what="the daemon to catch up",
                    )
            token = uuid.uuid4().hex
            for i in range(20):  # valid messages behind the junk
                await client.publish("fuzz/after/in", json.dumps({"probe": token, "i": i}), qos=1)
        await target.daemon.wait_stored(
            lambda: stored_count(target, "mqtt", f"%{token}%") == (20, 20),
            timeout_s=60,
            what=f"the 20 messages after {published} mutated ones (seed {run_seed})",
        )
    # Each message is one invocation, run or rejected: none lost, none twice. Counted in the
    # log: the store prunes its oldest records past max_db_mb, which the large payloads reach.
    expected = published + 20
    await target.daemon.wait_logged(
        lambda: len(handled) == expected,
        timeout_s=60,
        what=f"{expected} messages run or rejected (seed {run_seed})",
    )
    await assert_unharmed(target, mark, peak[0], run_seed)


# --- files ------------------------------------------------------------------------------------


def name_corpus() -> list[bytes]:
    return [
        b"report.csv",
        b"caf\xe9.txt",  # Latin-1: not UTF-8
        b".hidden",
        b"data.json~",
        b"upload.part",
        b"n" * 250 + b".txt",
        b"spaces and \xe2\x80\x94 dashes.txt",
        b"-rf",
        b"%s%n.txt",
    ]


def content_corpus() -> list[bytes]:
    noise = random.Random("files").randbytes(64 * 1024)  # the same on every run
    return [b"a,b,c\n1,2,3\n", b"", b"\x00\xff" * 100, b'{"k": "v"}', noise]


def file_name(mutator: Mutator) -> bytes | None:
    """A mutated name the kernel takes (no '/' or NUL, at most 255 bytes), or None."""
    name = mutator.pick().replace(b"/", b"_").replace(b"\x00", b"_")[:255]
    return None if name in (b"", b".", b"..") else name


def ignored(name: bytes) -> bool:
    text = os.fsdecode(name)
    return text.startswith(".") or text.endswith(IGNORED_SUFFIXES)


def backlog(inbox: Path, kept: set[bytes]) -> int:
    """Files dropped and not finished yet: in the folder (the ignored ones left out) or claimed."""
    waiting = set(os.listdir(bytes(inbox))) - kept - {b"done", b"failed", b".processing"}
    return len(waiting) + len(os.listdir(inbox / ".processing"))


def drop_file(inbox: Path, staging: Path, name: bytes, data: bytes, by_rename: bool) -> bool:
    """Write a file into the folder (in place, or elsewhere and renamed in); False when the
    name is taken."""
    dest = os.path.join(bytes(inbox), name)
    if os.path.lexists(dest):
        return False
    written = os.path.join(bytes(staging), name) if by_rename else dest
    with open(written, "wb") as file:
        file.write(data)
    if by_rename:
        os.rename(written, dest)
    return True


async def test_fuzz_watched_folder(target: Target) -> None:
    run_seed, deadline = seed(), time.monotonic() + budget_s()
    rng = stream("files", run_seed)
    names, contents = Mutator(rng, name_corpus()), Mutator(rng, content_corpus())
    staging, processing = target.inbox.parent / "staging", target.inbox / ".processing"
    staging.mkdir(exist_ok=True)
    mark, dropped, kept = Checkpoint.now(target.daemon), 0, set()
    async with rss_peak(target.daemon) as peak:
        while time.monotonic() < deadline:
            name = file_name(names)
            if name is None or name in kept:
                continue
            data = contents.pick() if rng.random() < 0.7 else rng.choice(content_corpus())
            if drop_file(target.inbox, staging, name, data, rng.random() < 0.5):
                dropped += 1
                if ignored(name):
                    kept.add(name)
            await until_changed(processing, lambda: backlog(target.inbox, kept) < BACKLOG)
        good = f"good-{uuid.uuid4().hex}.txt"
        (target.inbox / good).write_bytes(b"a good file after the junk")
        await target.daemon.wait_log("files_done", name=good, timeout_s=60)
    expected = dropped - len(kept) + 1  # each finished once: done, failed or rejected
    finished = Outcomes(mark, ("files_done", "files_failed", "files_rejected"))
    await target.daemon.wait_logged(
        lambda: len(finished) == expected,
        timeout_s=60,
        what=f"{expected} files finished (seed {run_seed})",
    )
    left = set(os.listdir(bytes(target.inbox))) - {b"done", b"failed", b".processing"}
    assert left == kept, f"seed {run_seed}"
    assert os.listdir(target.inbox / ".processing") == []
    await assert_unharmed(target, mark, peak[0], run_seed)
