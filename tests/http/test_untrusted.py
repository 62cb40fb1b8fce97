"""The checks on untrusted input that the listeners rely on, without a daemon."""

from __future__ import annotations

import json
import time

from daemon.untrusted import MAX_JSON_DEPTH, is_utf8, json_too_deep
from triggers.webhook import ReplayGuard


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_json_too_deep_counts_brackets_outside_strings():
    assert not json_too_deep(nested(MAX_JSON_DEPTH)) and json_too_deep(nested(MAX_JSON_DEPTH + 1))
    text = json.dumps(["\\", "[[[[", '"[[[', {"a": ["]]]]"]}]).encode()
    assert not json_too_deep(text, 3) and json_too_deep(text, 2)
    assert not json_too_deep(b'["' + b"[" * 2000 + b'"]')
    assert not json_too_deep(b"[" + b"[1, {}]," * 2000 + b"[]]")


def test_is_utf8_tells_surrogate_escaped_bytes():
    assert is_utf8("plain") and is_utf8("grüße")
    assert not is_utf8(b"a\xffb".decode("utf-8", "surrogateescape"))


def test_replay_guard_is_bounded_and_forgets_expired_signatures():
    guard = ReplayGuard(max_entries=3)
    future = time.time() + 300
    assert all(guard.claim(s, future) for s in "abc")
    assert not guard.claim("a", future)
    assert guard.claim("d", future)  # full: "a", the oldest, is forgotten, "d" is not refused
    assert (len(guard), guard.evicted) == (3, 1)
    assert guard.claim("a", future) and not guard.claim("c", future)
    guard = ReplayGuard()
    assert guard.claim("old", time.time() - 1) and guard.claim("new", future)
    assert len(guard) == 1  # "old" had expired: dropped on the next claim
    assert guard.claim("old", future) and not guard.claim("new", future)
    guard.release("new")
    assert guard.claim("new", future)


def test_listener_tests_use_this_depth():
    from tests.http import test_hostile_input

    assert test_hostile_input.MAX_JSON_DEPTH == MAX_JSON_DEPTH
