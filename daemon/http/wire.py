"""HTTP/1.1 on the daemon's listeners: one protocol owns every connection, llhttp frames it.

On a small board aiohttp's server costs more CPU per request than the whole rest of a warm
invocation, and its connections have no head or body timeout. A `FastSite` listens in place of
aiohttp's TCPSite; every connection is an `HttpConnection`, which parses with httptools (llhttp,
the strict parser uvicorn and Node.js use) and runs the aiohttp handler the app's route would, on a
`WireRequest` that carries the parts of `web.Request` our handlers read. The `web.Response` that
comes back is written out by hand.

What it guarantees, whatever the client sends (see ListenerSettings in daemon/config.py):
- A request head arrives within `head_timeout_s`, a body within `body_timeout_s` of its head, an
  idle keep-alive connection lasts `keepalive_s`, an answer the client does not take is dropped
  after `body_timeout_s`. Each ends the connection (a 408 first when a request was under way).
- The site's `router` sees each request as soon as its head is parsed: an unknown route, a wrong
  method or a failed header check is answered before a byte of the body is read, and a body
  announced over the limit is never read. Bodies that are read count against the listener's body
  budget (BODY_BUDGET_BODIES full bodies); a request past it waits, unread, until one is done.
- Reading stops while answers wait for the client (the transport's write buffer is over its high
  water mark) and while `max_pipelined` requests are parsed and not yet answered.
- Past `max_connections` open connections, the connection idle longest is closed to make room;
  when none is idle, the new one is answered 503 and closed.
- A head llhttp refuses (bare LF line ends, a TLS ClientHello, bad characters, conflicting
  framing), an HTTP/1.1 request without Host, or a head over MAX_HEAD_BYTES is answered 400 (431)
  and the connection is closed. Such requests are counted per kind in `ListenerStats` (shown on
  /health) and logged at info, a few per kind per ten seconds (logs.Throttle), without a traceback.

Requests on one connection are answered one at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from email.utils import formatdate
from functools import partial
from typing import Any

import httptools
import structlog
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web
from multidict import CIMultiDict, MultiDict
from yarl import URL

from daemon.config import ListenerSettings
from daemon.logs import Throttle

log = structlog.get_logger("lambdaemon.http")

Handler = Callable[[Any], Coroutine[Any, Any, web.StreamResponse]]
# Takes a request whose head is parsed: the handler that serves it once its body is here, a
# response to answer at once without reading the body, or None: the app's own routes serve it.
Router = Callable[["WireRequest"], "Handler | web.StreamResponse | None"]


class StreamedResponse(web.Response):
    """An answer whose body is produced as it goes (a log being followed): its head goes out at
    once, then each chunk `chunks` yields, chunked, while the client takes them. A client that
    stops reading holds the stream (and the producer's bounded queue fills, see daemon/tail.py)
    until body_timeout_s drops it; the listener's stop ends every stream at once."""

    def __init__(self, chunks: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunks = chunks


MAX_LINE_BYTES = 8190  # the request target, or one header field: as aiohttp (400 past it)
MAX_HEADERS = 128  # as aiohttp (400 past it)
MAX_HEAD_BYTES = 32 * 1024  # the whole head (431 past it; aiohttp allows 128 full lines)
BODY_BUDGET_BODIES = 4  # bodies of the listener's largest size held in memory at once
SWEEP_S = 1.0  # how often deadlines are checked: a timeout may run this much late
# Bytes parsed at a time: a body in whole reads, heads in small pieces, so that requests
# pipelined behind a full queue stay bytes; past max_pipelined a client gets at most one piece
# of requests parsed (PIPELINED_SLICE / 26, the smallest request's size: about 40).
FEED_SLICE = 256 * 1024
PIPELINED_SLICE = 1024
LINGER_S = 2.0  # after the last answer with input left unread, the close waits this long
DISCARD_BYTES = 64 * 1024  # a refused request's body up to this is read and dropped, not kept
_NO_BODY = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ListenerStats:
    """What one listener saw of its clients since start (shown on /health, counted per kind)."""

    __slots__ = ("open", "accepted", "evicted", "refused", "bad", "timeouts", "rejected", "_log")

    def __init__(self) -> None:
        self.open = self.accepted = self.evicted = self.refused = 0
        self.bad: Counter[str] = Counter()  # bad requests by kind
        self.timeouts: Counter[str] = Counter()  # connections ended by a deadline, by phase
        self.rejected: Counter[str] = Counter()  # the webhook listener's refusals, by reason
        self._log = Throttle()

    def report(self) -> dict[str, Any]:
        report = {
            "open": self.open,
            "accepted": self.accepted,
            "evicted_idle": self.evicted,
            "refused": self.refused,
            "bad_requests": dict(self.bad),
            "timeouts": dict(self.timeouts),
        }
        if self.rejected:
            report["rejected"] = dict(self.rejected)
        return report

    def bad_request(self, listener: str, kind: str, detail: str, remote: str | None) -> None:
        """Count a bad request; log it unless its kind was logged too often just now."""
        self.bad[kind] += 1
        suppressed = self._log.allow(kind, time.monotonic())
        if suppressed is not None:
            log.info(
                "http_bad_request",
                listener=listener,
                kind=kind,
                detail=detail[:200],
                remote=remote,
                count=self.bad[kind],
                suppressed=suppressed,
            )


# Per listener key ("api.listen", "webhooks.listen"): survives a webhook listener's rebind.
STATS: dict[str, ListenerStats] = {}


class _Body:
    """The `request.content` our handlers read: the whole body, already here (`data`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def iter_chunked(self, n: int) -> _Chunks:
        return _Chunks(self.data, n)


_EMPTY = _Body(b"")


class _Chunks:
    """iter_chunked()'s iterator: a class, not an async generator, which the loop would track
    in a WeakSet (two Python-level calls per request)."""

    __slots__ = ("_data", "_size", "_at")

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self._size, self._at = data, size, 0

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        at = self._at
        if at >= len(self._data):
            raise StopAsyncIteration
        self._at = at + self._size
        return self._data[at : at + self._size]


class WireRequest:
    """The parts of aiohttp's `web.Request` that the daemon's handlers read."""

    __slots__ = (
        "app",
        "method",
        "raw_path",
        "path",
        "headers",
        "version",
        "content_length",
        "content",
        "remote",
        "match_info",
        "max_body",
        "_raw_path",
        "_query_string",
        "_query",
    )
    scheme = "http"

    def __init__(
        self,
        app: web.Application,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        version: HttpVersion,
        content_length: int | None,
        remote: str | None,
    ) -> None:
        self.app, self.method, self.raw_path, self.headers = app, method, target, headers
        self.max_body: int | None = None  # a router's own limit for this request's body
        if target.startswith("/"):
            raw, _, self._query_string = target.partition("?")
        else:  # absolute-form (as sent to a proxy), `*`, or garbage: parsed as aiohttp does
            try:
                url = URL(target, encoded=True)
                raw, self._query_string = url.raw_path, url.raw_query_string
            except ValueError:
                raw, self._query_string = target, ""
        self._raw_path = raw
        # Percent-decoded as aiohttp does; the raw form stays in raw_path (and routes match it).
        path = URL.build(path=raw, encoded=True).path if "%" in raw else raw
        self.path, self.version = path, version
        self.content_length, self.remote = content_length, remote
        self.content = _EMPTY
        self.match_info: Any = {}
        self._query: MultiDict[str] | None = None

    @property
    def query(self) -> Any:
        if self._query is None:
            self._query = MultiDict(URL.build(query_string=self._query_string, encoded=True).query)
        return self._query

    @property
    def rel_url(self) -> URL:
        """What aiohttp's router resolves a request by."""
        return URL.build(path=self._raw_path, query_string=self._query_string, encoded=True)

    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type")
        return value.partition(";")[0].strip().lower() if value else "application/octet-stream"

    async def read(self) -> bytes:
        return self.content.data


# What a handler served by both this module and aiohttp (in tests, by aiohttp alone) takes.
AnyRequest = web.Request | WireRequest


class FastRunner(web.AppRunner):
    """aiohttp's AppRunner, which on cleanup also drains its FastSites' requests, in the step
    where aiohttp drains its own."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.fast_sites: list[FastSite] = []

    async def shutdown(self) -> None:
        await super().shutdown()
        await asyncio.gather(*(site.drain() for site in self.fast_sites))


class FastSite(web.BaseSite):
    """aiohttp's TCPSite, with every connection an `HttpConnection` (see the module doc).

    `router` picks what serves a request; `max_body` (read per request, so a reload changes it in
    place) bounds what is buffered; `limits` gives the timeouts and caps, also read live.
    """

    def __init__(
        self,
        runner: FastRunner,
        host: str,
        port: int,
        *,
        key: str,
        router: Router | None,
        max_body: Callable[[], int],
        limits: Callable[[], ListenerSettings],
        drain_s: float,
    ) -> None:
        super().__init__(runner)
        runner.fast_sites.append(self)
        self.key, self._host, self._port = key, host, port
        self.router, self.max_body, self.limits = router, max_body, limits
        self._drain_s = drain_s
        self.connections: set[HttpConnection] = set()
        # Connections between requests, longest idle first (the order eviction takes them in).
        self.idle: OrderedDict[HttpConnection, None] = OrderedDict()
        self._evicting = 0  # closed to make room, not yet gone
        self.stats = STATS.setdefault(key, ListenerStats())
        self.body_held = 0  # bytes of bodies reserved by requests in hand
        self.budget_waiters: deque[HttpConnection] = deque()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def body_budget(self) -> int:
        return BODY_BUDGET_BODIES * self.max_body()

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        app = getattr(self._runner, "app", None)
        assert isinstance(app, web.Application)
        self._server = await loop.create_server(
            lambda: HttpConnection(self, app, loop), self._host, self._port, reuse_address=True
        )
        self._sweeper = loop.create_task(self._sweep(), name=f"http-deadlines-{self.key}")

    async def stop(self) -> None:
        """Stop listening; close idle connections; busy ones close once answered."""
        await super().stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.idle or conn.lingering:
                conn.close()
            else:
                conn.closing = True
                if conn.streaming and conn.task is not None:
                    conn.task.cancel()  # a followed log ends with the listener, not its drain

    async def drain(self) -> None:
        """Give requests in hand `drain_s` to be answered, then cancel them."""
        busy = [conn.task for conn in self.connections if conn.task is not None]
        if busy:
            _, late = await asyncio.wait(busy, timeout=self._drain_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    def admit(self, conn: HttpConnection) -> bool:
        """Make room for `conn` under max_connections: False when there is none."""
        if len(self.connections) - self._evicting >= self.limits().max_connections:
            if not self.idle:
                self.stats.refused += 1
                return False
            longest, _ = self.idle.popitem(last=False)
            longest.evicted = True
            self._evicting += 1
            longest.close()
            self.stats.evicted += 1
        self.connections.add(conn)
        self.idle[conn] = None  # says nothing yet: the first to go when room is needed
        self.stats.accepted += 1
        self.stats.open = len(self.connections)
        return True

    def forget(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)
        self.idle.pop(conn, None)
        if conn.evicted:
            self._evicting -= 1
        self.stats.open = len(self.connections)

    def reserve(self, conn: HttpConnection, size: int) -> bool:
        """Hold `size` bytes of body budget for `conn`; False: wait in line (`granted` later)."""
        if not self.budget_waiters and self.body_held + size <= max(self.body_budget, size):
            self.body_held += size
            return True
        self.budget_waiters.append(conn)
        return False

    def cancel_wait(self, conn: HttpConnection) -> None:
        with contextlib.suppress(ValueError):
            self.budget_waiters.remove(conn)

    def release(self, size: int) -> None:
        self.body_held -= size
        while self.budget_waiters:
            conn = self.budget_waiters[0]
            wanted = conn.wanted
            if conn.transport is None or wanted == 0:
                self.budget_waiters.popleft()
                continue
            if self.body_held and self.body_held + wanted > self.body_budget:
                return
            self.budget_waiters.popleft()
            self.body_held += wanted
            conn.granted()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)  # a timer, not synchronisation
            now = time.monotonic()
            for conn in [c for c in self.connections if c.deadline < now]:
                conn.expire()


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order, enforces the limits."""

    def __init__(self, site: FastSite, app: web.Application, loop: asyncio.AbstractEventLoop):
        self.site, self.app, self.loop = site, app, loop
        self.limits = site.limits()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.deadline = time.monotonic() + self.limits.head_timeout_s  # the first head is due
        self.phase = "head"  # head | body | busy | idle (between requests) | write | linger
        self.task: asyncio.Task[web.StreamResponse] | None = None  # the request being served
        self.closing = False  # close once the requests in hand are answered
        self.evicted = False  # closed to make room for a new connection
        self.lingering = False  # answered and half-closed, not reading, closing soon (_end)
        self.peer_done = False  # the client closed its side: nothing more will arrive
        self.stop = False  # parse nothing more: what follows a request refused unread is not read
        # Parsed requests waiting their turn: (WireRequest or _Failed, (what serves it, budget)).
        self.queue: deque[tuple[Any, Any]] = deque()
        self.unparsed = b""  # received while reading is paused for the pipeline
        self._feeding = False  # inside parser.feed_data (callbacks must not feed again)
        self.paused: set[str] = set()  # why reading is paused: write, pipeline, budget
        self.wanted = 0  # body bytes the request being read waits for in the budget line
        # The request being parsed.
        self._url = bytearray()
        self._in_head = False  # between a request's first byte and the end of its head
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._request: WireRequest | None = None
        self._serve: Any = None  # its handler, response or None (the app routes it)
        self._body: list[bytes] = []
        self._body_size = 0
        self._held = 0  # budget it holds
        self._discard = False  # its body is read and dropped (the request was answered early)
        self.streaming = False  # self.task pumps a StreamedResponse's chunks
        self._writable: asyncio.Future[None] | None = None  # a stream waits for the client

    @property
    def idle(self) -> bool:
        """Between requests: nothing parsed, nothing running, nothing waiting."""
        return self.task is None and not self.queue and self._request is None and not self._in_head

    # --- the transport ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are no subclasses
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        if not self.site.admit(self):
            self.closing = True
            self._write(
                _render(_plain(503, "Service Unavailable: too many connections", retry=True))
            )
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        # A request being served runs to its end and is recorded; only its answer is lost.
        self.site.forget(self)
        self.transport = None
        if self.wanted:
            self.site.cancel_wait(self)
            self.wanted = 0
        for _, (_, held) in (item for item in self.queue if not isinstance(item[0], _Failed)):
            if held:
                self.site.release(held)
        self.queue.clear()
        self._drop_body()
        self._wake_writer()
        if self.streaming and self.task is not None:
            self.task.cancel()  # nobody is reading: the producer lets go at once

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # what was in flight when reading stopped (see _end): dropped
        if self.paused:
            self.unparsed += data  # bounded: reading is paused, at most one read arrives
            return
        if self.unparsed:
            data, self.unparsed = self.unparsed + data, b""
        self._feed(data)

    def eof_received(self) -> bool:
        if self.lingering:
            return False  # the client is done sending: close
        self.closing = self.peer_done = True
        # Keep the socket open to answer what is in hand.
        return self.task is not None or bool(self.queue)

    def pause_writing(self) -> None:
        self._pause("write")
        if not self.lingering:  # a lingering connection keeps its own deadline
            self.phase, self.deadline = "write", time.monotonic() + self.limits.body_timeout_s

    def resume_writing(self) -> None:
        self._resume("write")
        self._wake_writer()
        if self.phase == "write":
            self._set_idle_or_busy()
        self._next()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _end(self) -> None:
        """Close once the last answer is written. When input was left unread (a body refused
        from its head, a broken request), close only our side, and the rest LINGER_S later:
        closing with unread input makes the kernel reset the connection, and
        a client still sending would lose the answer it was sent (the lingering close of
        RFC 9112, section 9.6). Reading stops too: what still arrives waits in the kernel's
        buffers, costing no CPU here, and a sender that fills them waits on a full window until
        the close, its answer already delivered."""
        transport = self.transport
        if self.lingering:
            return
        if not self.stop or self.peer_done or transport is None or not transport.can_write_eof():
            self.close()
            return
        self.lingering = True
        self.phase, self.deadline = "linger", time.monotonic() + LINGER_S
        # Done with: the first to close when a new connection needs room.
        self.site.idle[self] = None
        self.site.idle.move_to_end(self, last=False)
        self.unparsed = b""
        transport.write_eof()
        if not self.paused:
            transport.pause_reading()
        self.paused.add("linger")

    def expire(self) -> None:
        """A deadline passed: say so when a request was under way, then close."""
        phase = self.phase
        if phase == "linger":
            self.close()
            return
        self.site.stats.timeouts[phase] += 1
        if phase in ("head", "body") and (self._in_head or self._request is not None):
            self.site.stats.bad_request(
                self.site.key, f"{phase}_timeout", f"no complete {phase} in time", self.remote
            )
            text = f"Request Timeout: the request {phase} did not arrive in time"
            self._write(_render(_plain(408, text)))
        if phase == "write" and self.transport is not None:
            self.transport.abort()  # the client does not read: what is buffered goes too
            return
        self.close()

    def _pause(self, reason: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(reason)

    def _resume(self, reason: str) -> None:
        self.paused.discard(reason)
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            if self.unparsed and not self._feeding:
                data, self.unparsed = self.unparsed, b""
                self._feed(data)

    # --- parsing ------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse `data` a slice at a time, keeping what must wait (reading paused) unparsed.

        Heads are parsed in small slices, so that requests pipelined behind a full queue stay
        bytes; a body in whole reads. Re-entered from a callback, it only appends.
        """
        if self._feeding:
            self.unparsed += data
            return
        self._feeding = True
        try:
            self._feed_slices(memoryview(data))
        finally:
            self._feeding = False

    def _feed_slices(self, data: memoryview) -> None:
        parser, at, end = self.parser, 0, len(data)
        while at < end:
            if self.stop or self.transport is None:
                self.unparsed = b""
                return  # a request refused unread ends the connection: the rest is not read
            if self.paused or len(self.queue) >= self.limits.max_pipelined:
                self.unparsed = bytes(data[at:]) + self.unparsed
                if not self.paused:
                    self._pause("pipeline")
                return
            size = FEED_SLICE if self._request is not None else PIPELINED_SLICE
            piece = data[at : at + size]
            at += len(piece)
            try:
                parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                # Served as a plain request; the connection is not handed over to anything.
                self.closing = self.stop = True
                return
            except httptools.HttpParserCallbackError as exc:
                if not isinstance(exc.__context__, _Refused):
                    raise  # a fault of ours, not of the request: the loop logs it
                self._refuse_bad(exc.__context__)
                return
            except httptools.HttpParserError as exc:
                self._refuse_bad(exc)
                return
        if self.unparsed and not self.paused:  # appended by a callback (see _feed)
            data, self.unparsed = memoryview(self.unparsed), b""
            self._feed_slices(data)

    def _refuse_bad(self, exc: Exception) -> None:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, _Refused):
            status, kind = exc.status, exc.kind
        else:
            status, kind = 400, "malformed"
            if self._request is not None:  # the head was fine: the body's framing broke
                kind = "malformed_body"
        self.site.stats.bad_request(self.site.key, kind, detail, self.remote)
        self._drop_body()
        self._request = None
        self._in_head = False
        self.closing = self.stop = True
        if self.task is None and not self.queue:
            self._write(_render(_plain(status, f"Bad Request: {detail}")))
            self._end()
        else:  # answered after what is in hand, in order
            self.queue.append((_Failed(status, detail), None))

    # httptools' callbacks

    def on_message_begin(self) -> None:
        self._url.clear()
        self._in_head = True
        self._headers = []
        self._head_size = 0
        self.site.idle.pop(self, None)
        if self.phase in ("idle", "head"):
            self.phase, self.deadline = "head", time.monotonic() + self.limits.head_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))
        if len(self._url) > MAX_LINE_BYTES:
            raise _Refused("line_too_long", f"the request target is over {MAX_LINE_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp hands a field over whole (it buffers pieces that span reads itself).
        self._headers.append((name, value))
        self._grow_head(len(name) + len(value) + 4)
        if len(name) + len(value) + 2 > MAX_LINE_BYTES:
            raise _Refused("line_too_long", f"a header field is over {MAX_LINE_BYTES} bytes")
        if len(self._headers) > MAX_HEADERS:
            raise _Refused("too_many_headers", f"more than {MAX_HEADERS} header fields")

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refused(
                "head_too_large", f"the request head is over {MAX_HEAD_BYTES} bytes", 431
            )

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = HttpVersion11 if parser.get_http_version() == "1.1" else HttpVersion10
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in self._headers:
            headers.add(
                name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
            )
        target = self._url.decode("utf-8", "surrogateescape")
        self._url.clear()
        self._in_head = False
        if version is HttpVersion11 and "Host" not in headers:
            raise _Refused("missing_host", "an HTTP/1.1 request must carry a Host header")
        if not parser.should_keep_alive():
            self.closing = True
        length_text = headers.get("Content-Length")
        chunked = "Transfer-Encoding" in headers
        length = int(length_text) if length_text is not None and not chunked else None
        method = parser.get_method().decode("ascii")
        request = WireRequest(self.app, method, target, headers, version, length, self.remote)
        self._request, self._body, self._body_size, self._discard = request, [], 0, False
        serve = self._route(request)
        self._serve = serve
        limit = request.max_body or self.site.max_body()
        expect = headers.get("Expect")
        if not isinstance(serve, web.StreamResponse) and (length or 0) > limit:
            serve = self._serve = _too_large(limit, length or 0)
        if isinstance(serve, web.StreamResponse):
            # Answered without its body: a small one is read and dropped, a large one never read.
            self._discard = True
            if (length or 0) > DISCARD_BYTES or chunked or expect is not None:
                self.closing = self.stop = True
            self._complete()
            return
        if expect is not None:
            if expect.lower() != "100-continue":
                self._serve = _plain(417, f"Expectation Failed: cannot meet Expect: {expect[:50]}")
                self._discard = self.closing = self.stop = True
                self._complete()
                return
            if version is HttpVersion11:
                self._write(_CONTINUE)
        if length == 0:
            return
        self.phase, self.deadline = "body", time.monotonic() + self.limits.body_timeout_s
        size = limit if chunked or length is None else length
        if self.site.reserve(self, size):
            self._held = size
        else:
            self.wanted = size
            self._pause("budget")

    def granted(self) -> None:
        """The body budget has room for the request waiting on it: read on."""
        self._held, self.wanted = self.wanted, 0
        self._resume("budget")

    def on_body(self, body: bytes) -> None:
        if self._discard:
            return
        self._body_size += len(body)
        allowed = self._held or self.wanted  # waiting for budget: what came with the head is kept
        if self._body_size > allowed and self._request is not None:  # chunked, past the limit
            request = self._request
            request.content_length = self._body_size
            serve = self._route(request)  # the router refuses it by its length, in its own words
            if not isinstance(serve, web.StreamResponse):
                serve = _too_large(self.site.max_body(), self._body_size)
            self._serve = serve
            self._drop_body()
            self._discard = self.closing = self.stop = True
            self._complete()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._discard:  # answered already, at its head
            self._discard = False
            self._request = None
            return
        request = self._request
        if request is None:
            return
        if self._body:
            request.content = _Body(self._body[0] if len(self._body) == 1 else b"".join(self._body))
            if request.content_length is None:
                request.content_length = len(request.content.data)
        self._body = []
        self._complete()

    def _complete(self) -> None:
        """The request in `_request` is ready to serve: queue it."""
        request = self._request
        assert request is not None
        self._request = None
        if self.wanted:  # the whole body came with its head, while it waited for the budget
            self.site.cancel_wait(self)
            self.wanted = 0
            self._resume("budget")
        held, self._held = self._held, 0
        self.queue.append((request, (self._serve, held)))
        if self.phase in ("head", "body"):
            self.phase = "busy"
            self.deadline = float("inf")
        if self.task is None:
            self._next()

    def _route(self, request: WireRequest) -> Handler | web.StreamResponse | None:
        serve = self.site.router(request) if self.site.router is not None else None
        if serve is not None:
            return serve
        match = _resolve_now(self.app, request)
        if match is None:
            return None  # resolved once the body is here (_dispatch)
        refusal: web.HTTPException | None = match.http_exception
        if refusal is not None:
            return refusal  # 404, 405: answered from the head
        request.match_info = match
        return _with_middlewares(self.app, match.handler)

    def _drop_body(self) -> None:
        if self._held:
            held, self._held = self._held, 0
            self.site.release(held)
        self._body = []

    # --- serving ------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start the next queued request, if the client takes answers."""
        if self.task is not None or "write" in self.paused or self.transport is None:
            return
        if not self.queue:
            if self.closing:
                self._end()
            else:
                self._set_idle_or_busy()
            return
        request, serve = self.queue.popleft()
        if isinstance(request, _Failed):
            self._write(_render(_plain(request.status, f"Bad Request: {request.detail}")))
            self._end()
            return
        if "pipeline" in self.paused and len(self.queue) < self.limits.max_pipelined:
            self._resume("pipeline")
        handler, held = serve
        self.task = task = self.loop.create_task(self._run(request, handler, held))
        task.add_done_callback(partial(self._answer, request))

    async def _run(self, request: WireRequest, serve: Any, held: int) -> web.StreamResponse:
        try:
            if isinstance(serve, web.StreamResponse):
                return serve
            if serve is None:
                return await self._dispatch(request)
            response: web.StreamResponse = await serve(request)
            return response
        finally:
            if held:
                self.site.release(held)

    async def _dispatch(self, request: WireRequest) -> web.StreamResponse:
        """Serve `request` by the app's own routes and middlewares, as aiohttp would."""
        match = await self.app.router.resolve(request)  # type: ignore[arg-type]
        request.match_info = match
        response: web.StreamResponse = await _with_middlewares(self.app, match.handler)(request)
        return response

    def _answer(self, request: WireRequest, task: asyncio.Task[web.StreamResponse]) -> None:
        self.task = None
        if self.streaming:  # a stream ended: its producer, its client or the listener stopped
            self.streaming = False
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("http_stream_failed", path=request.path[:200], error=repr(exc))
                self.closing = True
            elif task.cancelled():
                self.closing = True
            self._write(b"0\r\n\r\n")
            self._next()
            return
        if self.transport is None or self.transport.is_closing():
            return
        response: web.StreamResponse | None = None
        try:
            try:
                response = task.result()
            except web.HTTPException as exc:
                response = exc
            data = _render(response, request.method == "HEAD")
        except asyncio.CancelledError:  # the site is stopping past its drain
            self.close()
            return
        except Exception:
            log.exception("http_handler_failed", path=request.path[:200])
            data = _render(_plain(500, "500 Internal Server Error"))
            self.closing = True
        else:
            if self.closing or response.headers.get("Connection", "").lower() == "close":
                self.closing = True
                if "Connection" not in response.headers:
                    data = data.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
            elif request.version is HttpVersion10:
                data = data.replace(b"\r\n", b"\r\nConnection: keep-alive\r\n", 1)
        self._write(data)
        if isinstance(response, StreamedResponse) and request.method != "HEAD":
            self.streaming = True
            self.task = task = self.loop.create_task(self._stream(response))
            task.add_done_callback(partial(self._answer, request))
            self._set_idle_or_busy()
            return
        self._next()

    async def _stream(self, response: StreamedResponse) -> web.StreamResponse:
        """Write the chunks as they come, each once the client takes what went before."""
        chunks = response.chunks
        try:
            async for chunk in chunks:
                while "write" in self.paused and self.transport is not None:
                    self._writable = self.loop.create_future()
                    await self._writable
                if self.transport is None:
                    break
                if chunk:
                    self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        return response

    def _set_idle_or_busy(self) -> None:
        now = time.monotonic()
        if self.task is not None or self.queue:
            self.phase, self.deadline = "busy", float("inf")
        elif self._request is not None:
            self.phase, self.deadline = "body", now + self.limits.body_timeout_s
        elif self._in_head:
            self.phase, self.deadline = "head", now + self.limits.head_timeout_s
        else:  # site.idle keeps the order in which connections fell idle
            self.phase, self.deadline = "idle", now + self.limits.keepalive_s
            self.site.idle[self] = None
            self.site.idle.move_to_end(self)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def _resolve_now(app: web.Application, request: WireRequest) -> Any:
    """The app router's match for `request`, found at once, or None when it cannot be.

    aiohttp's `resolve()` is a coroutine only for custom resources that may wait; the plain and
    dynamic resources our apps use answer without suspending, so it is run to its end here, on
    the head, and a 404 or 405 goes out before the body is read. One that would suspend is
    closed unfinished and the request resolved again, once its body is read, in `_dispatch`.
    """
    coro = app.router.resolve(request)  # type: ignore[arg-type]
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    return None


def _with_middlewares(app: web.Application, handler: Any) -> Handler:
    for middleware in reversed(app.middlewares):
        handler = partial(middleware, handler=handler)
    return handler  # type: ignore[no-any-return]


class _Refused(Exception):
    """A head llhttp takes but the daemon does not: no Host, not a path, too large."""

    def __init__(self, kind: str, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.kind, self.status = kind, status


class _Failed:
    """A place in the queue for a bad request that follows pipelined good ones."""

    __slots__ = ("status", "detail")
    method = "GET"
    path = ""

    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail


def _too_large(limit: int, size: int) -> web.Response:
    """aiohttp's own answer to a body over the app's limit."""
    return web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)


def _plain(status: int, text: str, *, retry: bool = False) -> web.Response:
    headers = {"Retry-After": "1", "Connection": "close"} if retry else None
    return web.Response(status=status, text=text, headers=headers)


_date: tuple[int, bytes] = (0, b"")


def _render(response: web.StreamResponse, head_only: bool = False) -> bytes:
    """The response as bytes: status line, its headers, Date and Content-Length, the body.

    A header name or value that could end the head early is refused (ValueError), so nothing a
    handler returns can frame bytes the head does not announce.
    """
    global _date
    assert isinstance(response, web.Response), "only whole responses are served here"
    body = response.body
    if body is None:
        body = b""
    elif not isinstance(body, bytes):
        raise TypeError(f"cannot write a {type(body).__name__} body")
    now = int(time.time())
    if _date[0] != now:
        _date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode())
    head = [f"HTTP/1.1 {response.status} {response.reason}\r\n"]
    for name, value in response.headers.items():
        if name.lower() not in ("content-length", "transfer-encoding", "date"):
            head.append(f"{name}: {value}\r\n")
    status = response.status
    if isinstance(response, StreamedResponse):
        head.append("Transfer-Encoding: chunked\r\n")
        body = b""
    elif status not in _NO_BODY:
        head.append(f"Content-Length: {len(body)}\r\n")
    text = "".join(head)
    if text.count("\n") != len(head) or text.count("\r") != len(head):
        raise ValueError("a response header carries a line break")
    if head_only or status in _NO_BODY:
        body = b""
    return text.encode("utf-8", "surrogateescape") + _date[1] + b"\r\n" + body
