"""runtime.RequestReader: the Runtime API's HTTP requests read as their bytes arrive, in any
split, as both the daemon's loop and the bridge feed them."""

from __future__ import annotations

from daemon.pool.protocol import MAX_RESPONSE_BYTES
from daemon.pool.runtime import MAX_HEADER_BYTES, Request, RequestReader

NEXT = b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n"


def post(body: bytes, **headers: str) -> bytes:
    head = b"POST /2018-06-01/runtime/invocation/a/response HTTP/1.1\r\nHost: x\r\n"
    for name, value in headers.items():
        head += f"{name.replace('_', '-')}: {value}\r\n".encode()
    return head + b"\r\n" + body


def chunked(*chunks: bytes) -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks)
    return post(body + b"0\r\nX-Trailer: t\r\n\r\n", transfer_encoding="chunked")


def read(data: bytes, step: int) -> tuple[list[Request], RequestReader]:
    reader = RequestReader()
    requests = []
    for at in range(0, len(data), step):
        requests += reader.feed(data[at : at + step])
    return requests, reader


def test_requests_come_whole_whatever_the_split() -> None:
    data = NEXT + post(b'{"a":1}', content_length="7") + chunked(b"he", b"llo") + NEXT
    for step in (1, 2, 7, 64, len(data)):
        requests, reader = read(data, step)
        assert [(r.method, r.body) for r in requests] == [
            ("GET", b""),
            ("POST", b'{"a":1}'),
            ("POST", b"hello"),
            ("GET", b""),
        ], step
        assert requests[0].path == b"/2018-06-01/runtime/invocation/next"
        assert requests[1].headers["content-length"] == "7" and reader.refusal is None
        assert not any(r.too_large for r in requests)


def test_a_body_over_the_limit_is_dropped_as_it_comes_then_the_request_is_served() -> None:
    big = MAX_RESPONSE_BYTES + 1
    for data in (post(b"x" * big, content_length=str(big)), chunked(b"x" * 1000, b"y" * big)):
        reader = RequestReader()
        requests = []
        for at in range(0, len(data), 60_000):
            requests += reader.feed(data[at : at + 60_000])
            assert len(reader.buffer) + len(reader.body) <= 61_000  # never held
        requests += reader.feed(NEXT)
        assert [(r.too_large, r.body) for r in requests] == [(True, b""), (False, b"")]


def test_what_cannot_be_read_is_refused() -> None:
    cases = [
        (b"NONSENSE\r\n\r\n", 400),
        (post(b"", content_length="ten"), 400),
        (post(b"zz\r\n", transfer_encoding="chunked"), 400),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADER_BYTES // 6), 431),
    ]
    for data, status in cases:
        reader = RequestReader()
        assert reader.feed(data) == [] and reader.refusal is not None
        assert reader.refusal[0] == status, data[:40]
        assert reader.feed(NEXT) == []  # nothing more is read from that connection
    reader = RequestReader()  # what came before the bad request is still served
    assert len(reader.feed(NEXT + b"NONSENSE\r\n\r\n")) == 1 and reader.refusal is not None


def test_the_headers_the_api_reads_in_any_case_and_spacing() -> None:
    data = post(b"{}", Lambda_Runtime_Function_Error_Type="  My.Error ", CONTENT_LENGTH="2")
    [request] = RequestReader().feed(data)
    assert request.body == b"{}"
    assert request.headers["lambda-runtime-function-error-type"] == "My.Error"
    assert request.headers["content-length"] == "2"
