"""daemon/http/wire.py: requests framed by llhttp and served in order, over real loopback sockets.

aiohttp never answers on these listeners: its answers carry a `Server` header, ours do not.
The limits (timeouts, caps, flow control) are in test_limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest
import uvloop
from aiohttp import web

from daemon.config import ApiSettings
from daemon.http.api import start_site
from daemon.http.wire import WireRequest

MAX_BODY = 64 * 1024


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Runs a scenario on each loop the daemon may use: a hand-off swaps the protocol under
    the loop's own transport."""
    return uvloop.run if request.param == "uvloop" else asyncio.run


class Handlers:
    def __init__(self) -> None:
        self.order: list[str] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def echo(self, request: web.Request | WireRequest) -> web.Response:
        chunks = [chunk async for chunk in request.content.iter_chunked(1000)]
        body = b"".join(chunks)
        self.order.append(f"echo:{body.decode()}")
        headers = {
            "X-Path": request.path,
            "X-Query": request.query.get("q", ""),
            "X-Type": request.content_type,
            "X-Length": str(request.content_length),
        }
        return web.Response(body=body, headers=headers)

    async def slow(self, request: web.Request | WireRequest) -> web.Response:
        self.order.append("slow:start")
        self.started.set()
        await self.release.wait()
        self.order.append("slow:end")
        return web.Response(text="slow")

    async def boom(self, request: web.Request | WireRequest) -> web.Response:
        raise RuntimeError("the handler failed")

    async def teapot(self, request: web.Request | WireRequest) -> web.Response:
        raise web.HTTPNotFound(text="raised")

    async def empty(self, request: web.Request | WireRequest) -> web.Response:
        return web.Response(status=204, headers={"X-Empty": "yes"})

    def route(self, request: WireRequest):
        if request.path.startswith("/fast/"):
            return getattr(self, request.path.removeprefix("/fast/"), None)
        return None


@contextlib.asynccontextmanager
async def serving(
    handlers: Handlers, drain_s: float = 5.0, limits: ApiSettings | None = None
) -> AsyncIterator[tuple[int, web.AppRunner]]:
    app = web.Application()
    for name in ("echo", "slow", "boom", "teapot", "empty"):
        app.router.add_route("*", f"/fast/{name}", getattr(handlers, name))
    app.router.add_route("*", "/other", handlers.echo)
    runner = await start_site(
        app,
        "127.0.0.1:0",
        "test.listen",
        drain_s=drain_s,
        router=handlers.route,
        max_body=lambda: MAX_BODY,
        limits=lambda: limits or ApiSettings(),
    )
    try:
        yield runner.addresses[0][1], runner
    finally:
        await runner.cleanup()


async def read_response(reader: asyncio.StreamReader, *, head: bool = False):
    status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1."), status_line
    headers: dict[str, str] = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    length = int(headers.get("content-length", "0"))
    body = b"" if head or status == 204 else await reader.readexactly(length)
    return status, headers, body


def request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


@contextlib.asynccontextmanager
async def connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw client connection to the listener on `port`, closed on the way out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _wire_serves_routed_requests_on_one_kept_connection():
    handlers = Handlers()
    async with serving(handlers) as (port, _), connection(port) as (reader, writer):
        for i in range(3):
            writer.write(
                request(
                    "POST",
                    f"/fast/echo?q={i}",
                    f"body{i}".encode(),
                    "Content-Type: text/plain; charset=utf-8\r\n",
                )
            )
            async with asyncio.timeout(5):
                status, headers, body = await read_response(reader)
            assert (status, body) == (200, f"body{i}".encode())
            assert "server" not in headers  # the fast path answered
            assert headers["x-path"] == "/fast/echo" and headers["x-query"] == str(i)
            assert headers["x-type"] == "text/plain" and headers["x-length"] == "5"
            assert headers["date"].endswith(" GMT")


def test_wire_serves_routed_requests_on_one_kept_connection(run):
    run(_wire_serves_routed_requests_on_one_kept_connection())


async def _wire_answers_pipelined_requests_one_at_a_time_in_order():
    handlers = Handlers()
    async with serving(handlers) as (port, _), connection(port) as (reader, writer):
        writer.write(request("POST", "/fast/slow") + request("POST", "/fast/echo", b"second"))
        async with asyncio.timeout(5):
            await handlers.started.wait()
        assert handlers.order == ["slow:start"]  # the second waits for the first's answer
        handlers.release.set()
        async with asyncio.timeout(5):
            first, second = await read_response(reader), await read_response(reader)
        assert (first[2], second[2]) == (b"slow", b"second")
        assert handlers.order == ["slow:start", "slow:end", "echo:second"]


def test_wire_answers_pipelined_requests_one_at_a_time_in_order(run):
    run(_wire_answers_pipelined_requests_one_at_a_time_in_order())


async def _wire_frames_every_kind_of_request_itself(raw, expect_status, expect_body):
    handlers = Handlers()
    async with serving(handlers) as (port, _), connection(port) as (reader, writer):
        writer.write(raw)
        async with asyncio.timeout(5):
            if b"Expect: 100-continue" in raw:
                assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
                assert await reader.readline() == b"\r\n"
            status, headers, body = await read_response(reader)
        assert status == expect_status
        assert "server" not in headers  # never aiohttp's protocol
        if expect_body is not None:
            assert body == expect_body
            # and the connection keeps serving
            writer.write(request("POST", "/fast/echo", b"after"))
            async with asyncio.timeout(5):
                assert (await read_response(reader))[2] == b"after"
        else:
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # a broken request ends its connection


@pytest.mark.parametrize(
    "raw, expect_status, expect_body",
    [
        (
            b"POST /fast/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            200,
            b"abcde",
        ),
        (
            b"POST /fast/echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
            200,
            b"hi",
        ),
        (request("POST", "/other", b"elsewhere"), 200, b"elsewhere"),  # the app's own route
        (request("POST", "/fast/%65cho", b"encoded"), 200, b"encoded"),
        (
            request("POST", "/fast/echo", b"utf8").replace(
                b"Host: test", "Host: caf\u00e9".encode()
            ),
            200,
            b"utf8",
        ),
        (
            b"POST /fast/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nz",
            400,
            None,
        ),
        (b"GET /fast/echo HTTP/1.1\r\nbad header line\r\n\r\n", 400, None),
        (b"GET /fast/echo HTTP/1.1\nHost: t\n\n", 400, None),  # bare LF line ends
        (b"GET /fast/echo HTTP/1.1\r\n\r\n", 400, None),  # HTTP/1.1 without Host
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), 400, None),  # TLS hello
        (
            b"POST /fast/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            None,
        ),
        (request("POST", "/fast/echo", b"x" * (MAX_BODY + 1)), 413, None),
    ],
)
def test_wire_frames_every_kind_of_request_itself(run, raw, expect_status, expect_body):
    run(_wire_frames_every_kind_of_request_itself(raw, expect_status, expect_body))


async def _wire_serves_http10_and_head_on_a_kept_connection():
    handlers = Handlers()
    async with serving(handlers) as (port, _), connection(port) as (reader, writer):
        writer.write(request("POST", "/fast/echo", b"one"))
        async with asyncio.timeout(5):
            assert (await read_response(reader))[2] == b"one"
        writer.write(request("HEAD", "/other"))
        async with asyncio.timeout(5):
            status, headers, _ = await read_response(reader, head=True)
        assert status == 200 and headers["content-length"] == "0" and "server" not in headers
        writer.write(request("POST", "/fast/echo", b"three"))
        async with asyncio.timeout(5):
            assert (await read_response(reader))[2] == b"three"
    async with serving(handlers) as (port, _), connection(port) as (reader, writer):
        writer.write(b"POST /fast/echo HTTP/1.0\r\nContent-Length: 3\r\n\r\nold")
        async with asyncio.timeout(5):
            status, headers, body = await read_response(reader)
            assert (status, body, headers["connection"]) == (200, b"old", "close")
            assert await reader.read() == b""  # HTTP/1.0 without keep-alive: closed
    async with serving(handlers) as (port, _), connection(port) as (reader, writer):
        keep = b"Connection: keep-alive\r\n"
        writer.write(b"POST /fast/echo HTTP/1.0\r\n" + keep + b"Content-Length: 1\r\n\r\na")
        async with asyncio.timeout(5):
            status, headers, body = await read_response(reader)
        assert (body, headers["connection"]) == (b"a", "keep-alive")
        writer.write(request("POST", "/fast/echo", b"b"))
        async with asyncio.timeout(5):
            assert (await read_response(reader))[2] == b"b"


def test_wire_serves_http10_and_head_on_a_kept_connection(run):
    run(_wire_serves_http10_and_head_on_a_kept_connection())


async def _wire_waits_for_a_body_that_arrives_in_pieces():
    handlers = Handlers()
    body = "0123456789\u00e9\x00".encode() * 100  # any bytes: only the head must be ASCII
    raw = request("POST", "/fast/echo", body)
    async with serving(handlers) as (port, _), connection(port) as (reader, writer):
        for start in range(0, len(raw), 97):
            writer.write(raw[start : start + 97])
            await writer.drain()
        async with asyncio.timeout(5):
            status, headers, answer = await read_response(reader)
        assert (status, answer) == (200, body) and "server" not in headers


def test_wire_waits_for_a_body_that_arrives_in_pieces(run):
    run(_wire_waits_for_a_body_that_arrives_in_pieces())


async def _wire_closes_after_connection_close_and_renders_errors():
    handlers = Handlers()
    async with serving(handlers) as (port, _):
        async with connection(port) as (reader, writer):
            writer.write(request("POST", "/fast/echo", b"bye", "Connection: TE, Close\r\n"))
            async with asyncio.timeout(5):
                assert (await read_response(reader))[2] == b"bye"
                assert await reader.read() == b""  # closed by the server
        async with connection(port) as (reader, writer):
            writer.write(request("POST", "/fast/teapot") + request("POST", "/fast/empty"))
            async with asyncio.timeout(5):
                status, headers, body = await read_response(reader)
                assert (status, body) == (404, b"raised")
                status, headers, body = await read_response(reader)
            assert status == 204 and headers["x-empty"] == "yes" and "content-length" not in headers
        async with connection(port) as (reader, writer):
            writer.write(request("POST", "/fast/boom"))
            async with asyncio.timeout(5):
                status, _, body = await read_response(reader)
                assert (status, body) == (500, b"500 Internal Server Error")
                assert await reader.read() == b""


def test_wire_closes_after_connection_close_and_renders_errors(run):
    run(_wire_closes_after_connection_close_and_renders_errors())


async def _wire_stop_closes_idle_connections_and_lets_busy_ones_answer():
    handlers = Handlers()
    async with serving(handlers) as (port, runner):
        async with (
            connection(port) as (idle_reader, idle_writer),
            connection(port) as (busy_reader, busy_writer),
        ):
            idle_writer.write(request("POST", "/fast/echo", b"warm"))
            async with asyncio.timeout(5):
                await read_response(idle_reader)
            busy_writer.write(request("POST", "/fast/slow"))
            async with asyncio.timeout(5):
                await handlers.started.wait()
            stopping = asyncio.ensure_future(runner.cleanup())
            async with asyncio.timeout(5):
                assert await idle_reader.read() == b""  # the idle one is closed at once
            assert not stopping.done()  # the busy one is still being answered
            handlers.release.set()
            async with asyncio.timeout(5):
                assert (await read_response(busy_reader))[2] == b"slow"
                assert await busy_reader.read() == b""
                await stopping


def test_wire_stop_closes_idle_connections_and_lets_busy_ones_answer(run):
    run(_wire_stop_closes_idle_connections_and_lets_busy_ones_answer())


async def _wire_cancels_a_request_still_running_past_the_drain():
    handlers = Handlers()
    async with serving(handlers, drain_s=0.2) as (port, runner), connection(port) as (reader, _w):
        _w.write(request("POST", "/fast/slow"))
        async with asyncio.timeout(5):
            await handlers.started.wait()
            await runner.cleanup()
            assert await reader.read() == b""
        assert "slow:end" not in handlers.order


def test_wire_cancels_a_request_still_running_past_the_drain(run):
    run(_wire_cancels_a_request_still_running_past_the_drain())


async def _wire_closes_connections_idle_past_the_keepalive():
    handlers = Handlers()
    limits = ApiSettings(keepalive_s=0.3)
    async with serving(handlers, limits=limits) as (port, _), connection(port) as (reader, writer):
        writer.write(request("POST", "/fast/echo", b"once"))
        async with asyncio.timeout(5):
            assert (await read_response(reader))[2] == b"once"
            assert await reader.read() == b""


def test_wire_closes_connections_idle_past_the_keepalive(run):
    run(_wire_closes_connections_idle_past_the_keepalive())


async def _wire_survives_damaged_requests():
    """Random damage to a plain request: each gets a well-formed answer or a closed
    connection, never an exception in the loop, and the listener keeps serving."""
    rng = random.Random(7)
    base = request("POST", "/fast/echo?q=1", b'{"k": 1}', "Content-Type: application/json\r\n")
    handlers = Handlers()
    errors: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    async with serving(handlers) as (port, _):
        for _ in range(300):
            raw = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(raw))
                choice = rng.random()
                if choice < 0.4:
                    raw[at] = rng.choice(b"\x00\t\r\n :%/.?#\x7f\xc3abcXYZ0129")
                elif choice < 0.7:
                    del raw[at : at + rng.randint(1, 8)]
                else:
                    insert = [b"\r\n", b" ", b"Content-Length: 99\r\n", b"\xe9", b":"]
                    raw[at:at] = rng.choice(insert)
            async with connection(port) as (reader, writer):
                writer.write(bytes(raw))
                writer.write_eof()
                async with asyncio.timeout(5):
                    answer = await reader.read()
            assert answer == b"" or answer.startswith(b"HTTP/1."), answer[:80]
        async with connection(port) as (reader, writer):  # still serving
            writer.write(request("POST", "/fast/echo", b"fine"))
            async with asyncio.timeout(5):
                status, headers, body = await read_response(reader)
        assert (status, body) == (200, b"fine") and "server" not in headers
    assert errors == []


def test_wire_survives_damaged_requests(run):
    run(_wire_survives_damaged_requests())
