"""Deployed code, published versions and aliases, and the history of every change to them.

The rows live in the tables of migration v5; each body is one struct of this module, encoded
with msgspec. daemon/versions.py owns the rules (what may change, which number comes next) and
keeps the state in memory; it writes here each change together with its history entry, in one
transaction, and reads everything back once at start.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec


class Code(msgspec.Struct, frozen=True):
    """An unpacked package (daemon/packages.py) and the environment built for it."""

    sha256: str  # Lambda's CodeSha256: base64 of the SHA-256 of the zip
    size: int  # bytes of the zip
    path: str  # the unpacked folder, data_dir/code/<hex digest>
    deps: str | None = None  # data_dir/envs/<key>, when the package has a requirements.txt


class Settings(msgspec.Struct, frozen=True):
    """What a published version keeps of its function's settings (Lambda's snapshot)."""

    handler: str
    timeout_s: float
    memory_mb: int
    env: dict[str, str] = {}


class Latest(msgspec.Struct, frozen=True):
    """`$LATEST` as last deployed: replaces the config's `code` until the next deploy."""

    function: str
    code: Code
    deployed_at: float
    revision_id: str


class Version(msgspec.Struct, frozen=True):
    function: str
    number: int
    code: Code
    settings: Settings
    description: str
    published_at: float
    revision_id: str


class Alias(msgspec.Struct, frozen=True):
    function: str
    name: str
    version: str  # "$LATEST" or a number
    weights: dict[str, float]  # RoutingConfig.AdditionalVersionWeights: at most one entry
    description: str
    updated_at: float
    revision_id: str


class Change(msgspec.Struct, frozen=True):
    """One entry of a function's deploy history: who changed what, when."""

    function: str
    at: float
    # deploy | publish | create_alias | update_alias | rollback | delete_alias | delete_version
    action: str
    actor: str
    version: str | None = None
    alias: str | None = None
    previous: str | None = None  # an alias's version before the change; the replaced code's sha
    detail: dict[str, Any] = {}
    id: int = 0  # the row id, filled in when read back


class DeployState(msgspec.Struct, frozen=True):
    latest: list[Latest]
    versions: list[Version]
    aliases: list[Alias]
    counters: dict[str, int]


_encode = msgspec.json.Encoder().encode


def _decoder(kind: type[Any]) -> Any:
    return msgspec.json.Decoder(kind).decode


_latest, _version, _alias, _change = (_decoder(k) for k in (Latest, Version, Alias, Change))


# --- writes: each runs in the store's writer thread, inside one transaction --------------------


def _history(conn: sqlite3.Connection, change: Change) -> None:
    conn.execute(
        "INSERT INTO deploy_history (function, at, body) VALUES (?, ?, ?)",
        (change.function, change.at, _encode(change)),
    )


def save_latest(conn: sqlite3.Connection, latest: Latest, change: Change) -> None:
    conn.execute(
        "INSERT INTO deployed_code (function, body) VALUES (?, ?)"
        " ON CONFLICT (function) DO UPDATE SET body = excluded.body",
        (latest.function, _encode(latest)),
    )
    _history(conn, change)


def save_version(conn: sqlite3.Connection, version: Version, change: Change) -> None:
    conn.execute(
        "INSERT INTO function_versions (function, version, body) VALUES (?, ?, ?)",
        (version.function, version.number, _encode(version)),
    )
    conn.execute(
        "INSERT INTO version_counters (function, last) VALUES (?, ?)"
        " ON CONFLICT (function) DO UPDATE SET last = max(version_counters.last, excluded.last)",
        (version.function, version.number),
    )
    _history(conn, change)


def save_alias(conn: sqlite3.Connection, alias: Alias, change: Change) -> None:
    conn.execute(
        "INSERT INTO function_aliases (function, name, body) VALUES (?, ?, ?)"
        " ON CONFLICT (function, name) DO UPDATE SET body = excluded.body",
        (alias.function, alias.name, _encode(alias)),
    )
    _history(conn, change)


def delete_alias(conn: sqlite3.Connection, function: str, name: str, change: Change) -> None:
    conn.execute("DELETE FROM function_aliases WHERE function = ? AND name = ?", (function, name))
    _history(conn, change)


def delete_versions(
    conn: sqlite3.Connection, function: str, numbers: list[int], change: Change
) -> None:
    conn.executemany(
        "DELETE FROM function_versions WHERE function = ? AND version = ?",
        [(function, n) for n in numbers],
    )
    _history(conn, change)


# --- reads ------------------------------------------------------------------------------------


def load(conn: sqlite3.Connection) -> DeployState:
    latest = [_latest(row[0]) for row in conn.execute("SELECT body FROM deployed_code")]
    versions = [
        _version(row[0])
        for row in conn.execute("SELECT body FROM function_versions ORDER BY function, version")
    ]
    aliases = [
        _alias(row[0])
        for row in conn.execute("SELECT body FROM function_aliases ORDER BY function, name")
    ]
    counters = dict(conn.execute("SELECT function, last FROM version_counters").fetchall())
    return DeployState(latest, versions, aliases, counters)


HISTORY = (
    "SELECT id, body FROM deploy_history WHERE function = ? AND id < ? ORDER BY id DESC LIMIT ?"
)


def history_rows(rows: list[sqlite3.Row]) -> list[Change]:
    return [msgspec.structs.replace(_change(row["body"]), id=row["id"]) for row in rows]


QUEUED_VERSIONS = (
    "SELECT DISTINCT function_version FROM invocations"
    " WHERE function = ? AND status IN ('queued', 'running')"
)
