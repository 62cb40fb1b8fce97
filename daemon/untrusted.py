"""Checks on bytes from outside: how deep JSON nests, and text that is not UTF-8.

msgspec, the json module and most handlers' own code recurse once per level of JSON nesting,
against Python's recursion limit (1,000 frames, shared with whatever is on the stack already):
a 2 KB document of 1,000 nested arrays raises RecursionError wherever it is parsed. Rather than
letting the stack depth of the moment decide, a document is held to MAX_JSON_DEPTH levels where
it comes in; well below the limit, so a handler can still walk what it was given.

aiohttp decodes header values as UTF-8 with "surrogateescape": a byte that is not UTF-8 becomes
a lone surrogate, which no UTF-8 encoder (JSON, SQLite, the log) accepts. `is_utf8` tells them
apart before such a string goes anywhere.
"""

from __future__ import annotations

import re
from itertools import accumulate

MAX_JSON_DEPTH = 512

# A JSON string once its escaped backslashes and quotes are gone: removed before counting, so
# brackets in text do not count.
_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text `raw` nests arrays and objects more than `limit` levels deep.

    Without recursion, and without a Python-level loop for the usual document: one that opens
    no more than `limit` brackets cannot be deeper. Made for valid JSON; for anything else the
    answer is a guess that the parser's own error then overrides.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # Escapes read left to right, as a parser reads them: escaped backslashes, then quotes.
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _STRING.sub(b"", unescaped).translate(None, _NOT_BRACKET)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit


def is_utf8(text: str) -> bool:
    """False when `text` holds a byte that was not UTF-8 (a lone surrogate, see module doc)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
