"""Small shared helpers of daemon/models.py."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from daemon.models import new_id


def test_new_id_is_an_rfc_4122_version_7_uuid_that_grows_with_time():
    before = int(time.time() * 1000)
    ids = [new_id() for _ in range(20_000)]
    after = int(time.time() * 1000)
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # lower-case, hyphenated: as str(uuid.uuid4()) prints it
        assert before <= parsed.int >> 80 <= after  # the first 48 bits: Unix milliseconds
    # every variant digit (8, 9, a, b) turns up: the bits come from the random bytes
    assert {text[19] for text in ids} == set("89ab")
    # ids of different milliseconds sort by time, as text too
    stamps = [uuid.UUID(text).int >> 80 for text in ids]
    assert all(a <= b for a, b in zip(stamps, stamps[1:], strict=False))
    first, last = ids[0], ids[-1]
    assert stamps[0] == stamps[-1] or first < last


def test_new_id_random_bits_are_not_repeated_across_threads_or_a_fork():
    new_id()  # the parent now holds unused random bytes that a forked child must not reuse
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, new_id()[14:].encode())
        os._exit(0)
    os.close(write_end)
    child_tail = os.read(read_end, 100).decode()
    os.waitpid(pid, 0)
    assert child_tail and child_tail != new_id()[14:]
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: new_id(), range(20_000)))
    assert len({text[14:] for text in ids}) == len(ids)
