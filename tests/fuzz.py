"""A small seeded mutation fuzzer for what the daemon takes from outside (tests/test_fuzz.py).

Each target starts from a corpus of valid inputs (HTTP requests, MQTT payloads, file names and
contents) and sends them after one to four byte-level mutations: a flipped bit, an inserted
CR/LF/NUL/0xff/%/: or quote, a span deleted or repeated, two corpus entries spliced, a cut, a
number grown past what it framed. Valid inputs reach the deep code; the mutations are what a
client, a broker or a file producer gets wrong, or does on purpose.

Every random choice comes from `stream(name)`, a random.Random seeded with the run's seed and
the stream's name: a run with the same seed sends the same inputs in the same order on each
stream (what the daemon answers may interleave differently). A failure names the seed and the
input; reproduce it, or fuzz for an hour, with

    LAMBDAEMON_FUZZ_SEED=<seed> LAMBDAEMON_FUZZ_SECONDS=900 ./tests/run tests/test_fuzz.py -x
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SEED_ENV = "LAMBDAEMON_FUZZ_SEED"
SECONDS_ENV = "LAMBDAEMON_FUZZ_SECONDS"
DEFAULT_SEED = 20261204  # fixed, so that a failure in CI reproduces
DEFAULT_SECONDS = 8.0  # per target (there are four): the whole file stays near a minute
MAX_BYTES = 1 << 20  # a mutated input is cut here: repeated spans must not grow without end

# What a client gets wrong at a byte: line ends, NUL, bytes that are not UTF-8, the characters
# that split a header, escape a URL, start JSON nesting or end a string.
SPECIAL = (
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b"\xff",
    b"\x80",
    b"\xc3",
    b"%",
    b"%00",
    b"%ff",
    b":",
    b" ",
    b"\t",
    b'"',
    b"\\",
    b"[" * 600,
    b"{",
    b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
)
# What a length field is grown to: a little past, far past, and past what 32 and 64 bits hold.
GROWN = (1, 2, 1000, 65536, 2**31, 2**32 + 1, 2**63, 10**30)
_NUMBER = re.compile(rb"[0-9]+|[0-9a-fA-F]+(?=\r\n)")  # decimal lengths, hex chunk sizes


def seed() -> int:
    """The run's seed: LAMBDAEMON_FUZZ_SEED (decimal), or the fixed default."""
    return int(os.environ.get(SEED_ENV) or DEFAULT_SEED)


def budget_s() -> float:
    """Seconds of fuzzing per target: LAMBDAEMON_FUZZ_SECONDS, or a small default for CI."""
    return float(os.environ.get(SECONDS_ENV) or DEFAULT_SECONDS)


def stream(name: str, run_seed: int | None = None) -> random.Random:
    """The random choices of one input stream; the same for the same seed and name."""
    return random.Random(f"{seed() if run_seed is None else run_seed}:{name}")


def about(run_seed: int, data: bytes, limit: int = 600) -> str:
    """How a failure names its input: the seed to rerun with, and the bytes (cut)."""
    shown = repr(data[:limit]) + (f" ... ({len(data)} bytes)" if len(data) > limit else "")
    return f"{SEED_ENV}={run_seed}: {shown}"


class Mutator:
    """Byte-level mutations of the entries of one corpus, drawn from `rng`."""

    def __init__(self, rng: random.Random, corpus: Sequence[bytes]) -> None:
        self.rng, self.corpus = rng, list(corpus)
        self._ops: list[Callable[[bytes], bytes]] = [
            self.flip,
            self.insert,
            self.insert,  # the special bytes find the most bugs: drawn twice as often
            self.delete,
            self.duplicate,
            self.splice,
            self.truncate,
            self.grow,
        ]

    def pick(self) -> bytes:
        """A corpus entry with one to four mutations."""
        return self.mutate(self.rng.choice(self.corpus))

    def mutate(self, data: bytes) -> bytes:
        for _ in range(self.rng.randint(1, 4)):
            data = self.rng.choice(self._ops)(data)
        return data[:MAX_BYTES]

    def _at(self, data: bytes) -> int:
        return self.rng.randint(0, len(data))

    def _span(self, data: bytes) -> tuple[int, int]:
        start = self._at(data)
        return start, min(len(data), start + self.rng.choice((1, 2, 8, 64, 4096)))

    def flip(self, data: bytes) -> bytes:
        if not data:
            return bytes([self.rng.randrange(256)])
        at = self.rng.randrange(len(data))
        return data[:at] + bytes([data[at] ^ (1 << self.rng.randrange(8))]) + data[at + 1 :]

    def insert(self, data: bytes) -> bytes:
        at, special = self._at(data), self.rng.choice(SPECIAL)
        return data[:at] + special * self.rng.choice((1, 1, 2, 50)) + data[at:]

    def delete(self, data: bytes) -> bytes:
        start, end = self._span(data)
        return data[:start] + data[end:]

    def duplicate(self, data: bytes) -> bytes:
        start, end = self._span(data)
        return data[:end] + data[start:end] * self.rng.choice((1, 2, 100)) + data[end:]

    def splice(self, data: bytes) -> bytes:
        other = self.rng.choice(self.corpus)
        return data[: self._at(data)] + other[self._at(other) :]

    def truncate(self, data: bytes) -> bytes:
        return data[: self._at(data)]

    def grow(self, data: bytes) -> bytes:
        """A number (a Content-Length, a chunk size, a JSON value) made larger."""
        numbers = list(_NUMBER.finditer(data))
        if not numbers:
            return self.insert(data)
        found = self.rng.choice(numbers)
        hexadecimal = found.group().endswith(b"\r\n") or not found.group().isdigit()
        base = int(found.group(), 16 if hexadecimal else 10) if len(found.group()) < 40 else 0
        grown = base + self.rng.choice(GROWN)
        text = f"{grown:x}" if hexadecimal else str(grown)
        return data[: found.start()] + text.encode() + data[found.end() :]


# --- HTTP ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A valid request, rendered as exact bytes; `sign` adds headers computed over the body
    (an HMAC signature), so a request whose body alone is mutated still passes the check."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    chunked: bool = False
    sign: Callable[[bytes], list[tuple[str, str]]] | None = field(default=None, compare=False)

    def render(self, body: bytes | None = None) -> bytes:
        body = self.body if body is None else body
        fields = [("Host", "127.0.0.1"), *self.headers, *(self.sign(body) if self.sign else [])]
        if self.chunked:
            fields.append(("Transfer-Encoding", "chunked"))
        else:
            fields.append(("Content-Length", str(len(body))))
        head = "".join(f"{name}: {value}\r\n" for name, value in fields)
        line = f"{self.method} {self.target} HTTP/1.1\r\n"
        return (line + head + "\r\n").encode() + (chunk(body) if self.chunked else body)


def chunk(body: bytes, size: int = 7) -> bytes:
    """`body` in the chunked transfer coding, `size` bytes a chunk, ended by the last chunk."""
    pieces = (body[at : at + size] for at in range(0, len(body), size))
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class RequestFuzzer:
    """Mutated requests from a corpus of `Request`s: whole requests mutated as bytes, bodies
    mutated inside valid framing (and a fresh signature), and pipelined pairs."""

    def __init__(self, rng: random.Random, corpus: Sequence[Request]) -> None:
        self.rng, self.corpus = rng, list(corpus)
        self.bytes = Mutator(rng, [r.render() for r in corpus] + [r.body for r in corpus])

    def one(self) -> bytes:
        request = self.rng.choice(self.corpus)
        roll = self.rng.random()
        if roll < 0.3:  # the framing holds: the mutated body reaches the handler's event
            return request.render(self.bytes.mutate(request.body))
        if roll < 0.4:
            return request.render()
        return self.bytes.mutate(request.render())

    def pick(self) -> bytes:
        """One input for one connection: a request, or a pipelined pair."""
        if self.rng.random() < 0.15:
            return self.one() + self.one()
        return self.one()


def replies(data: bytes) -> tuple[list[int], bytes]:
    """The status of each answer in `data`, as a client reads them in order, and any bytes
    that do not frame as an answer (nothing should be left). A head followed at once by
    another status line is taken as the answer to a HEAD (a Content-Length, no body)."""
    statuses, at = [], 0
    while at < len(data):
        end = data.find(b"\r\n\r\n", at)
        line = data[at : data.find(b"\r\n", at)]
        if end < 0 or not re.fullmatch(rb"HTTP/1\.[01] [0-9]{3}( .*)?", line, re.DOTALL):
            break
        statuses.append(int(line[9:12]))
        length = re.search(rb"\r\ncontent-length: *([0-9]+)\r\n", data[at : end + 2], re.I)
        at = end + 4
        size = int(length[1]) if length else 0
        if data.startswith(b"HTTP/1.", at) and not data.startswith(b"HTTP/1.", at + size):
            size = 0
        at += size
    return statuses, data[at:]
