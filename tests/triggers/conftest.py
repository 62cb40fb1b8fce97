"""Fixtures shared by the trigger tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mosquitto import Mosquitto, running_broker


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private broker on a free loopback port, persistence under tmp_path/mosquitto."""
    with running_broker(tmp_path / "mosquitto") as broker:
        yield broker
