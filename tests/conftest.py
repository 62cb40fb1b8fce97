"""Fixtures every test folder may use: the private PostgreSQL cluster, started once per session
(on first use only: a run that needs no PostgreSQL starts none), and the store on either
backend (tests/postgres.py's open_store)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres import Postgres


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Postgres]:
    cluster = Postgres()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
