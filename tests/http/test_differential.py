"""The daemon's HTTP listener and aiohttp's own server, fed the same bytes, answer alike.

One app is served twice: by daemon/http/wire.py (as the daemon serves its listeners) and by
aiohttp's TCPSite alone. Each request of the corpus, valid or broken, goes to both on a fresh
connection; the answers must have the same status and, for a served request, the same body.
Where the two may rightly differ, `DIFFERENT` says how and why; nothing else may.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from daemon.config import ApiSettings
from daemon.http.api import start_site

MAX_BODY = 4096


async def echo(request: Any) -> web.Response:
    body = await request.read()
    headers = {
        "X-Path": request.path,
        "X-Query": ",".join(f"{k}={v}" for k, v in request.query.items()),
        "X-Id": request.match_info.get("id", ""),
    }
    return web.Response(body=body, headers=headers)


def build_app() -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/items/{id}", echo)
    app.router.add_post("/only-post", echo)
    return app


def fast_router(request: Any) -> Any:
    return echo if request.path == "/fast" else None


@contextlib.asynccontextmanager
async def both() -> AsyncIterator[tuple[int, int]]:
    ours = await start_site(
        build_app(),
        "127.0.0.1:0",
        "differential.listen",
        router=fast_router,
        max_body=lambda: MAX_BODY,
        limits=lambda: ApiSettings(head_timeout_s=2, body_timeout_s=2),
    )
    app = build_app()
    app.router.add_route("*", "/fast", echo)
    bare = web.AppRunner(app, access_log=None, handle_signals=False)
    await bare.setup()
    site = web.TCPSite(bare, "127.0.0.1", 0)
    await site.start()
    try:
        yield ours.addresses[0][1], bare.addresses[0][1]
    finally:
        await ours.cleanup()
        await bare.cleanup()


async def exchange(port: int, raw: bytes) -> tuple[int | None, bytes]:
    """The first answer to `raw` (status, body), or (None, b"") for a connection closed without
    one; a connection left open with nothing said for 3 s counts as a hang."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        async with asyncio.timeout(3):
            line = await reader.readline()
            if not line:
                return None, b""
            assert line.startswith(b"HTTP/1."), line[:80]
            status = int(line.split()[1])
            length = None
            while (field := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = field.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = b"" if length is None else await reader.readexactly(length)
            return status, body
    except TimeoutError:
        return -1, b"hang"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def req(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + body


OK_HEAD = "POST /echo HTTP/1.1\nHost: t\nContent-Length: 2\n\n"
CORPUS: dict[str, bytes] = {
    "get": req("GET /echo HTTP/1.1\nHost: t\n\n"),
    "post": req(OK_HEAD, b"hi"),
    "fast route": req("POST /fast HTTP/1.1\nHost: t\nContent-Length: 2\n\n", b"hi"),
    "query": req("GET /echo?a=1&b=%20x&c HTTP/1.1\nHost: t\n\n"),
    "dynamic route": req("GET /items/42 HTTP/1.1\nHost: t\n\n"),
    "percent path": req("GET /%65cho HTTP/1.1\nHost: t\n\n"),
    "percent in param": req("GET /items/a%2Fb HTTP/1.1\nHost: t\n\n"),
    "unknown route": req("GET /nowhere HTTP/1.1\nHost: t\n\n"),
    "wrong method": req("GET /only-post HTTP/1.1\nHost: t\n\n"),
    "head": req("HEAD /items/1 HTTP/1.1\nHost: t\n\n"),
    "options": req("OPTIONS /echo HTTP/1.1\nHost: t\n\n"),
    "custom method": req("PURGE /echo HTTP/1.1\nHost: t\n\n"),
    "http/1.0": req("GET /echo HTTP/1.0\n\n"),
    "http/1.0 with body": req("POST /echo HTTP/1.0\nContent-Length: 2\n\n", b"hi"),
    "chunked": req(
        "POST /echo HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n\n", b"2\r\nhi\r\n0\r\n\r\n"
    ),
    "chunked with extension": req(
        "POST /echo HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n\n", b"2;x=y\r\nhi\r\n0\r\n\r\n"
    ),
    "chunked trailer": req(
        "POST /echo HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n\n",
        b"2\r\nhi\r\n0\r\nX: y\r\n\r\n",
    ),
    "expect continue": req(
        "POST /echo HTTP/1.1\nHost: t\nExpect: 100-continue\nContent-Length: 2\n\n", b"hi"
    ),
    "utf-8 header": req("GET /echo HTTP/1.1\nHost: t\nX-Name: caf\xc3\xa9\n\n"),
    "latin-1 header": req("GET /echo HTTP/1.1\nHost: t\nX-Name: caf\xe9\n\n"),
    "obs-text in cookie": req("GET /echo HTTP/1.1\nHost: t\nCookie: a=\xff\n\n"),
    "empty header value": req("GET /echo HTTP/1.1\nHost: t\nX-Empty:\n\n"),
    "body over the limit": req(
        f"POST /echo HTTP/1.1\nHost: t\nContent-Length: {MAX_BODY + 1}\n\n", b"x" * (MAX_BODY + 1)
    ),
    "chunked over the limit": req(
        "POST /echo HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n\n",
        b"%x\r\n" % (MAX_BODY + 1) + b"x" * (MAX_BODY + 1) + b"\r\n0\r\n\r\n",
    ),
    "connection close": req("GET /echo HTTP/1.1\nHost: t\nConnection: close\n\n"),
    # broken
    "missing host": req("GET /echo HTTP/1.1\n\n"),
    "bare LF": b"GET /echo HTTP/1.1\nHost: t\n\n",
    "bare CR": b"GET /echo HTTP/1.1\rHost: t\r\r",
    "TLS client hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "garbage": b"\x00\x01\x02 hello\r\n\r\n",
    "space in header name": req("GET /echo HTTP/1.1\nHost: t\nBad Name: v\n\n"),
    "space before colon": req("GET /echo HTTP/1.1\nHost: t\nX-A : v\n\n"),
    "no colon": req("GET /echo HTTP/1.1\nHost: t\nnocolon\n\n"),
    "obs-fold": req("GET /echo HTTP/1.1\nHost: t\nX-A: one\n two\n\n"),
    "control char in value": req("GET /echo HTTP/1.1\nHost: t\nX-A: a\x01b\n\n"),
    "NUL in target": req("GET /ec\x00ho HTTP/1.1\nHost: t\n\n"),
    "space in target": req("GET /e cho HTTP/1.1\nHost: t\n\n"),
    "bad version": req("GET /echo HTTP/9.9\nHost: t\n\n"),
    "lowercase method": req("get /echo HTTP/1.1\nHost: t\n\n"),
    "two content-lengths": req(
        "POST /echo HTTP/1.1\nHost: t\nContent-Length: 2\nContent-Length: 3\n\n", b"hi"
    ),
    "same content-length twice": req(
        "POST /echo HTTP/1.1\nHost: t\nContent-Length: 2\nContent-Length: 2\n\n", b"hi"
    ),
    "negative content-length": req("POST /echo HTTP/1.1\nHost: t\nContent-Length: -1\n\n"),
    "non-numeric content-length": req("POST /echo HTTP/1.1\nHost: t\nContent-Length: 1x\n\n"),
    "plus content-length": req("POST /echo HTTP/1.1\nHost: t\nContent-Length: +2\n\n", b"hi"),
    "content-length and chunked": req(
        "POST /echo HTTP/1.1\nHost: t\nContent-Length: 2\nTransfer-Encoding: chunked\n\n",
        b"0\r\n\r\n",
    ),
    "unknown transfer-encoding": req(
        "POST /echo HTTP/1.1\nHost: t\nTransfer-Encoding: gzip\n\n", b"hi"
    ),
    "chunked not last": req(
        "POST /echo HTTP/1.1\nHost: t\nTransfer-Encoding: chunked, gzip\n\n", b"0\r\n\r\n"
    ),
    "bad chunk size": req(
        "POST /echo HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n\n", b"zz\r\nhi\r\n0\r\n\r\n"
    ),
    "unknown expect": req("POST /echo HTTP/1.1\nHost: t\nExpect: magic\nContent-Length: 0\n\n"),
    "absolute-form target": req("GET http://t/echo HTTP/1.1\nHost: t\n\n"),
    "asterisk target": req("OPTIONS * HTTP/1.1\nHost: t\n\n"),
    "long header value": req("GET /echo HTTP/1.1\nHost: t\nX-Long: " + "v" * 9000 + "\n\n"),
    "long target": req("GET /echo?" + "q" * 9000 + " HTTP/1.1\nHost: t\n\n"),
    "head over 32 KiB": req(
        "GET /echo HTTP/1.1\nHost: t\n" + ("X-L: " + "v" * 8000 + "\n") * 5 + "\n"
    ),
    "many headers": req("GET /echo HTTP/1.1\nHost: t\n" + "X-H: v\n" * 200 + "\n"),
}

# Where the daemon answers otherwise than aiohttp on purpose: its own status, and why.
DIFFERENT = {
    "head over 32 KiB": (
        431,
        "aiohttp takes 128 fields of 8190 bytes (1 MiB) in a head; ours 32 KiB",
    ),
}


@pytest.fixture(scope="module")
def answers() -> dict[str, tuple[tuple[int | None, bytes], tuple[int | None, bytes]]]:
    async def collect() -> dict[str, Any]:
        async with both() as (ours, bare):
            return {
                name: (await exchange(ours, raw), await exchange(bare, raw))
                for name, raw in CORPUS.items()
            }

    return asyncio.run(collect())


@pytest.mark.parametrize("name", list(CORPUS))
def test_the_listener_answers_as_aiohttp_does(answers: dict[str, Any], name: str) -> None:
    (status, body), (bare_status, bare_body) = answers[name]
    assert status != -1, "the daemon's listener left the connection hanging"
    assert status is None or status < 500, f"the daemon's listener answered {status}"
    if name in DIFFERENT:
        assert status == DIFFERENT[name][0]
        return
    assert status == bare_status, (
        f"ours {status} {body[:120]!r}, aiohttp {bare_status} {bare_body[:120]!r}"
    )
    if status is not None and status < 300:
        assert body == bare_body
