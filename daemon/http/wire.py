"""HTTP/1.1 on the daemon's listeners without aiohttp's per-request machinery.

On a small board aiohttp's server costs more CPU per request than the whole rest of a warm
invocation. A `FastSite` listens in place of aiohttp's TCPSite; each connection starts with a
`FastConnection`, which frames plain requests itself (request line, headers, a Content-Length
body) and runs the same aiohttp handler the app's route would, on a `WireRequest` that carries
the parts of `web.Request` our handlers read. The `web.Response` that comes back is written
out by hand.

Anything else (chunked bodies, `Expect`, `Upgrade`, HTTP/1.0, HEAD, percent-encoded or odd
paths, non-ASCII headers, bodies over the site's limit, a request the site's router does not
take, anything malformed) is not interpreted here: the connection is handed, from that request
on, to aiohttp's own protocol, which parses and answers it as if it had owned the connection
all along. Requests on one connection are answered one at a time, in order.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Coroutine
from email.utils import formatdate
from typing import Any, Literal

import structlog
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict, MultiDict
from yarl import URL

log = structlog.get_logger("lambdaemon.http")

Handler = Callable[[Any], Coroutine[Any, Any, web.StreamResponse]]
# Takes a parsed request; the handler that serves it here, or None: aiohttp serves it.
Router = Callable[["WireRequest"], Handler | None]

MAX_HEAD_BYTES = 16 * 1024  # aiohttp's own limits are per line (8190); a larger head goes to it
KEEPALIVE_S = 75.0  # as aiohttp: an idle keep-alive connection is closed after this long
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Header lines as RFC 9110 has them (token ":" visible ASCII, spaces, tabs), no obs-fold.
_HEAD = re.compile(r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*")
_TARGET = re.compile(r"/[!$&'()*+,\-.0-9:;=@A-Z_a-z~/?]*")  # no %, #, spaces, controls
_HANDED_OFF = frozenset({"transfer-encoding", "expect", "upgrade"})
_NO_BODY = frozenset({204, 304})


class _Body:
    """The `request.content` our handlers read: the whole body, already here (`data`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def iter_chunked(self, n: int) -> _Chunks:
        return _Chunks(self.data, n)


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
    """The parts of aiohttp's `web.Request` that the handlers served here read."""

    __slots__ = (
        "app",
        "method",
        "raw_path",
        "path",
        "headers",
        "content_length",
        "content",
        "remote",
        "match_info",
        "_query_string",
        "_query",
    )
    version = HttpVersion11
    scheme = "http"

    def __init__(
        self,
        app: web.Application,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        content_length: int | None,
        remote: str | None,
    ) -> None:
        self.app, self.method, self.raw_path, self.headers = app, method, target, headers
        self.path, _, self._query_string = target.partition("?")
        self.content_length, self.remote = content_length, remote
        self.content = _Body(b"")
        self.match_info: dict[str, str] = {}
        self._query: MultiDict[str] | None = None

    @property
    def query(self) -> Any:
        if self._query is None:
            self._query = MultiDict(URL.build(query_string=self._query_string, encoded=True).query)
        return self._query

    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type")
        return value.partition(";")[0].strip().lower() if value else "application/octet-stream"


# What a handler served both here and by aiohttp takes.
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
    """aiohttp's TCPSite, but connections start on the fast path (see the module doc).

    `router` picks the handler for a request; `max_body_bytes` bounds what is buffered here.
    """

    __slots__ = ("_host", "_port", "_router", "_max_body", "_drain_s", "_connections", "_sweeper")
    keepalive_s = KEEPALIVE_S

    def __init__(
        self,
        runner: FastRunner,
        host: str,
        port: int,
        *,
        router: Router,
        max_body_bytes: int,
        drain_s: float,
    ) -> None:
        super().__init__(runner)
        runner.fast_sites.append(self)
        self._host, self._port, self._router = host, port, router
        self._max_body, self._drain_s = max_body_bytes, drain_s
        self._connections: set[FastConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server, app = self._runner.server, getattr(self._runner, "app", None)
        assert server is not None and isinstance(app, web.Application)
        self._server = await loop.create_server(
            lambda: FastConnection(self, server, app, loop),
            self._host,
            self._port,
            reuse_address=True,
        )
        self._sweeper = loop.create_task(self._sweep(), name="http-keepalive-sweeper")

    async def stop(self) -> None:
        """Stop listening; close idle connections; busy ones close once answered."""
        await super().stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._connections):
            if conn.task is None:
                conn.close()
            else:
                conn.closing = True

    async def drain(self) -> None:
        """Give requests in hand `drain_s` to be answered, then cancel them."""
        busy = [conn.task for conn in self._connections if conn.task is not None]
        if busy:
            _, late = await asyncio.wait(busy, timeout=self._drain_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_s / 5)  # a timer, not synchronisation
            expired = time.monotonic() - self.keepalive_s
            for conn in list(self._connections):
                if conn.task is None and conn.idle_since < expired:
                    conn.close()


class FastConnection(asyncio.Protocol):
    """One client connection on the fast path, until it is handed to aiohttp."""

    def __init__(
        self,
        site: FastSite,
        server: web.Server,
        app: web.Application,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.site, self.server, self.app, self.loop = site, server, app, loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[web.StreamResponse] | None = None  # the request in hand
        self.idle_since = time.monotonic()
        self.closing = False  # close once the request in hand is answered
        self._remote: str | None = None
        self._path = ""  # of the request in hand, for the log
        self._reading_paused = self._writing_paused = False
        self._head: tuple[WireRequest, Handler, int] | None = None  # parsed, body still due

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are no subclasses
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        self.site._connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        # A request in hand runs to its end and is recorded; only its answer has nowhere to go.
        self.site._connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._serve_next()
        elif len(self.buffer) > MAX_HEAD_BYTES + self.site._max_body and self.transport:
            self._reading_paused = True  # a pipelining client waits until we catch up
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.closing = True
        return self.task is not None  # keep the socket open to answer the request in hand

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.task is None:
            self._serve_next()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- requests -----------------------------------------------------------------------------

    def _serve_next(self) -> None:
        if self._writing_paused or self.transport is None:
            return
        if self._head is None:
            if not self.buffer:
                if self.closing:
                    self.close()
                return
            head = self._parse_head()
            if head is None:
                return  # more to come
            if head is False:
                self._hand_off()
                return
            self._head = head
        request, handler, end = self._head
        if len(self.buffer) < end:
            return  # the body is still arriving
        self._head = None
        self._start(request, handler, end)

    def _parse_head(self) -> tuple[WireRequest, Handler, int] | Literal[False] | None:
        """(request, handler, end of its body) for a request served here; False: hand it off;
        None: the head is incomplete."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False if len(buffer) > MAX_HEAD_BYTES else None
        head = bytes(buffer[: end + 2])
        if end > MAX_HEAD_BYTES or not head.isascii():
            return False
        line_end = head.find(b"\r\n")
        request_line = head[:line_end].decode("ascii")
        fields = head[line_end + 2 :].decode("ascii")
        parts = request_line.split(" ")
        if (
            len(parts) != 3
            or parts[2] != "HTTP/1.1"
            or parts[0] not in _METHODS
            or not _TARGET.fullmatch(parts[1])
            or "/." in parts[1]
            or not _HEAD.fullmatch(fields)
        ):
            return False
        headers: CIMultiDict[str] = CIMultiDict()
        length: int | None = None
        for line in fields.split("\r\n")[:-1]:
            name, _, value = line.partition(":")
            value = value.strip(" \t")
            lower = name.lower()
            if lower in _HANDED_OFF:
                return False
            if lower == "content-length":
                if length is not None or not value.isdigit() or len(value) > 12:
                    return False
                length = int(value)
            elif lower == "connection" and "close" in _tokens(value):
                self.closing = True
            headers.add(name, value)
        if (length or 0) > self.site._max_body:
            return False  # aiohttp streams it and the handler refuses it with a 413
        request = WireRequest(self.app, parts[0], parts[1], headers, length, self._remote)
        handler = self.site._router(request)
        if handler is None:
            return False
        return request, handler, end + 4 + (length or 0)

    def _start(self, request: WireRequest, handler: Handler, end: int) -> None:
        body_at = end - (request.content_length or 0)
        if request.content_length:
            request.content = _Body(bytes(self.buffer[body_at:end]))
        del self.buffer[:end]
        self._path = request.path
        self.task = task = self.loop.create_task(handler(request))
        task.add_done_callback(self._answer)

    def _answer(self, task: asyncio.Task[web.StreamResponse]) -> None:
        self.task = None
        self.idle_since = time.monotonic()
        if self.transport is None or self.transport.is_closing():
            return
        try:
            try:
                response = task.result()
            except web.HTTPException as exc:
                response = exc
            data = _render(response)
        except asyncio.CancelledError:  # the site is stopping past its drain
            self.close()
            return
        except Exception:
            log.exception("http_handler_failed", path=self._path)
            data = _render(web.Response(status=500, text="500 Internal Server Error"))
            self.closing = True
        else:
            if response.headers.get("Connection", "").lower() == "close":
                self.closing = True
        self.transport.write(data)
        if self.closing and not self.buffer:
            self.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if self.buffer and not self.closing:
            self._serve_next()
        elif self.closing:
            self.close()

    def _hand_off(self) -> None:
        """aiohttp's protocol takes over this connection, from the first unanswered byte on."""
        transport = self.transport
        assert transport is not None and self.task is None
        self.site._connections.discard(self)
        self.transport = None
        protocol = self.server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._reading_paused:
            transport.resume_reading()
        data, self.buffer = bytes(self.buffer), bytearray()
        protocol.data_received(data)


def _tokens(value: str) -> list[str]:
    return [token.strip().lower() for token in value.split(",")]


_date: tuple[int, bytes] = (0, b"")


def _render(response: web.StreamResponse) -> bytes:
    """The response as bytes: status line, its headers, Date and Content-Length, the body."""
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
    if response.status not in _NO_BODY:
        head.append(f"Content-Length: {len(body)}\r\n")
    return "".join(head).encode("utf-8", "surrogateescape") + _date[1] + b"\r\n" + body
