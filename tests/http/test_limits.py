"""daemon/http/wire.py's limits, over real loopback sockets: what a client that is slow, greedy,
broken or hostile gets, and what it costs the listener.

Each test serves a small app on a listener of its own with tight limits, talks to it with raw
sockets, and looks at the listener's own state (its connections, body budget, counters) where
that is what the guarantee is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from daemon.config import ApiSettings
from daemon.http.api import start_site
from daemon.http.wire import (
    PIPELINED_SLICE,
    SWEEP_S,
    FastRunner,
    FastSite,
    HttpConnection,
    WireRequest,
)
from tests.http.test_wire import connection as client
from tests.waits import until, watch_logs

MAX_BODY = 1000
BIG = b"b" * (256 * 1024)


class App:
    def __init__(self) -> None:
        self.served = 0
        self.release = asyncio.Event()

    async def echo(self, request: Any) -> web.Response:
        self.served += 1
        return web.Response(body=await request.read())

    async def big(self, request: Any) -> web.Response:
        self.served += 1
        return web.Response(body=BIG)

    async def held(self, request: Any) -> web.Response:
        self.served += 1
        await self.release.wait()
        return web.Response(text="released")

    def route(self, request: WireRequest) -> Any:
        if request.path == "/secret" and request.headers.get("Authorization") != "Bearer t":
            return web.Response(status=401, text="no")
        return {"/echo": self.echo, "/big": self.big, "/held": self.held}.get(request.path)


@contextlib.asynccontextmanager
async def listener(**limits: Any) -> AsyncIterator[tuple[int, FastSite, App]]:
    app, handlers = web.Application(), App()
    app.router.add_post("/secret", handlers.echo)
    settings = ApiSettings(**limits)
    runner = await start_site(
        app,
        "127.0.0.1:0",
        f"limits{id(handlers)}.listen",
        router=handlers.route,
        max_body=lambda: MAX_BODY,
        limits=lambda: settings,
    )
    assert isinstance(runner, FastRunner)
    site = runner.fast_sites[0]
    try:
        yield runner.addresses[0][1], site, handlers
    finally:
        handlers.release.set()
        await runner.cleanup()


def post(path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def connections(site: FastSite) -> list[HttpConnection]:
    return list(site.connections)


# --- deadlines --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "phase", "status"),
    [
        (b"", "head", None),  # connected, never said a word: closed without an answer
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-", "head", 408),  # slowloris
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc", "body", 408),
        (
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            "body",
            408,
        ),
    ],
)
async def test_a_request_that_does_not_arrive_in_time_ends_its_connection(
    sent: bytes, phase: str, status: int | None
):
    async with listener(head_timeout_s=0.3, body_timeout_s=0.3) as (port, site, _):
        async with client(port) as (reader, writer):
            started = time.monotonic()
            writer.write(sent)
            async with asyncio.timeout(5):
                got = await reader.read()
            took = time.monotonic() - started
        assert took < 0.3 + SWEEP_S + 1.0, took
        if status is None:
            assert got == b""
        else:
            assert got.startswith(f"HTTP/1.1 {status} ".encode()), got
            assert b"did not arrive in time" in got
        assert site.stats.timeouts[phase] == 1
        assert site.connections == set() and site.body_held == 0


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_s():
    async with listener(keepalive_s=0.3, head_timeout_s=30) as (port, site, _):
        async with client(port) as (reader, writer):
            writer.write(post("/echo", b"one"))
            async with asyncio.timeout(5):
                assert await answer(reader) == (200, b"one")
                assert await reader.read() == b""
        assert site.stats.timeouts["idle"] == 1


async def test_a_client_that_takes_no_answers_stops_being_read_and_is_dropped():
    """Requests for big answers, pipelined, never reading: the listener stops reading once the
    answers back up, serves no more than the socket buffers hold, and drops the connection
    `body_timeout_s` later."""
    async with listener(body_timeout_s=1.0, max_pipelined=4) as (port, site, handlers):
        async with client(port) as (_reader, writer):
            writer.transport.set_write_buffer_limits(high=64 * 1024 * 1024)
            writer.write(post("/big") * 2000)  # 2000 answers of 256 KiB: 500 MB
            # nothing announces the pause to a test: poll the connection's state
            conn = (await until(lambda: connections(site), 5, "the connection"))[0]
            await until(lambda: "write" in conn.paused, 10, "reading paused by the write side")
            served = handlers.served
            assert served < 200  # what the kernel's buffers took, not all 2000
            assert len(conn.queue) <= 4 + PIPELINED_SLICE // 30
            assert len(conn.unparsed) <= 4 * 1024 * 1024
            await until(lambda: not site.connections, 5, "the connection dropped")
        assert handlers.served == served  # nothing more was served after the pause
        assert site.stats.timeouts["write"] == 1


async def test_pipelined_requests_wait_unparsed_past_max_pipelined():
    async with listener(max_pipelined=4) as (port, site, handlers):
        async with client(port) as (reader, writer):
            writer.write(post("/held") + post("/echo", b"x") * 300)
            conn = (await until(lambda: connections(site), 5, "the connection"))[0]
            # the pause is announced to no one: poll
            await until(lambda: "pipeline" in conn.paused, 5, "reading paused for the pipeline")
            assert len(conn.queue) <= 4 + PIPELINED_SLICE // len(post("/echo", b"x"))
            assert conn.unparsed  # the rest waits as bytes, not as requests
            handlers.release.set()
            async with asyncio.timeout(10):
                assert await answer(reader) == (200, b"released")
                for _ in range(300):
                    assert await answer(reader) == (200, b"x")
        assert handlers.served == 301


# --- refused before the body is read ----------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /nowhere HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n", 404),
        (b"POST /secret HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n", 401),
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n", 413),
        (b"POST /nowhere HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n", 404),
        (
            b"POST /secret HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
            401,
        ),
    ],
)
async def test_a_refused_request_is_answered_from_its_head_alone(head: bytes, status: int):
    async with listener() as (port, site, handlers):
        async with client(port) as (reader, writer):
            writer.write(head)  # and not one byte of the body
            async with asyncio.timeout(5):
                got, _ = await answer(reader)
                assert got == status
                assert await reader.read() == b""  # the body is never read: the connection ends
        assert site.body_held == 0 and handlers.served == 0


async def test_a_client_still_sending_a_refused_body_reads_its_answer():
    """The answer goes out from the head; the body still arriving is dropped, not met with a
    reset that would destroy the answer in the client's buffers."""
    size = 8_000_000
    for path, status in (("/nowhere", 404), ("/echo", 413)):
        async with listener() as (port, site, _), client(port) as (reader, writer):
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode()
            )

            async def send() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(size // 65536):
                        writer.write(b"z" * 65536)
                        await writer.drain()

            sending = asyncio.ensure_future(send())
            async with asyncio.timeout(10):
                assert (await answer(reader))[0] == status
                assert await reader.read() == b""
            await sending
            assert site.body_held == 0


async def test_a_small_refused_body_is_read_and_dropped_and_the_connection_kept():
    async with listener() as (port, _, _):
        async with client(port) as (reader, writer):
            writer.write(post("/secret", b"s" * 500) + post("/echo", b"next"))
            async with asyncio.timeout(5):
                assert (await answer(reader))[0] == 401
                assert await answer(reader) == (200, b"next")


async def test_bodies_in_memory_stay_within_the_budget_and_all_are_served():
    """Budget: 4 bodies of MAX_BODY. A fifth request waits, unread, until one is done."""
    async with listener() as (port, site, handlers):
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(client(port)) for _ in range(5)]
            for i, (_, writer) in enumerate(clients):
                writer.write(post("/echo", bytes([65 + i]) * MAX_BODY)[:-10])  # 10 bytes short
                # the budget is announced to no one: poll
                await until(lambda i=i: site.body_held == min(i + 1, 4) * MAX_BODY, 5, "held")
            await until(lambda: len(site.budget_waiters) == 1, 5, "the fifth waiting")
            assert site.body_held == 4 * MAX_BODY
            for i, (reader, writer) in enumerate(clients):
                writer.write(bytes([65 + i]) * 10)
                async with asyncio.timeout(5):
                    assert await answer(reader) == (200, bytes([65 + i]) * MAX_BODY)
                assert site.body_held <= 4 * MAX_BODY
        assert handlers.served == 5
        await until(lambda: site.body_held == 0, 5, "the budget released")


# --- the connection cap -----------------------------------------------------------------------


async def test_past_max_connections_the_longest_idle_goes_then_new_ones_are_refused():
    async with listener(max_connections=3) as (port, site, _):
        async with contextlib.AsyncExitStack() as stack:
            first, *others = [await stack.enter_async_context(client(port)) for _ in range(3)]
            for reader, writer in (first, *others):
                writer.write(post("/echo", b"hi"))
                async with asyncio.timeout(5):
                    assert await answer(reader) == (200, b"hi")
            newest = await stack.enter_async_context(client(port))
            async with asyncio.timeout(5):
                assert await first[0].read() == b""  # the longest idle made room
            newest[1].write(post("/echo", b"in"))
            async with asyncio.timeout(5):
                assert await answer(newest[0]) == (200, b"in")
            for _, writer in (*others, newest):
                writer.write(b"POST /echo HTTP/1.1\r\n")  # each one busy with a head
            await until(lambda: not any(c.idle for c in site.connections), 5, "all busy")
            refused = await stack.enter_async_context(client(port))
            async with asyncio.timeout(5):
                got = await refused[0].read()
            assert got.startswith(b"HTTP/1.1 503 ") and b"too many connections" in got
        assert (site.stats.evicted, site.stats.refused) == (1, 1)


# --- broken requests --------------------------------------------------------------------------


async def test_bad_requests_are_counted_each_and_logged_a_few_per_kind():
    with watch_logs() as logs:
        async with listener() as (port, site, _):
            for _ in range(40):
                async with client(port) as (reader, writer):
                    writer.write(b"GET /echo HTTP/1.1\nHost: t\n\n")
                    async with asyncio.timeout(5):
                        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
            assert site.stats.bad["malformed"] == 40
    lines = [e for e in logs.entries if e["event"] == "http_bad_request"]
    assert 1 <= len(lines) <= 10
    assert all(e["log_level"] == "info" and "exc_info" not in e for e in lines)
    assert [e for e in logs.entries if e["log_level"] in ("error", "critical")] == []
