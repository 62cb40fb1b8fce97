"""Small shared helpers of daemon/models.py."""

from __future__ import annotations

import uuid

from daemon.models import new_id


def test_new_id_is_a_random_rfc_4122_version_4_uuid():
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # lower-case, hyphenated: as str(uuid.uuid4()) prints it
    # every variant digit (8, 9, a, b) turns up: the bits come from the random bytes
    assert {text[19] for text in ids} == set("89ab")
