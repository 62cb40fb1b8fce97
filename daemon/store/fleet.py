"""The fleet's rows: each node's lease in `nodes`, and the work a node takes over from a dead one.

Several daemons (nodes) may share one PostgreSQL store (docs/store.md). Each holds a lease in
its `nodes` row, renewed every third of `lease_s`; the lease is counted on the database's clock
(clock_timestamp()), so the nodes' own clocks may differ. A node owns the invocations whose
`node` names it: it accepted them, or took them over. A node whose lease ran out is dead: any
other node may take its queued and running invocations over (take_over), as many as it has free
slots for, each in one transaction that holds the dead node's `nodes` row. A node that starts
again under the same id first renews its row (join), which waits for a takeover in progress,
and then recovers what is still its own. Rows no node owns are taken over as a dead node's
are: rows written before the fleet, and those a node with a long backlog released for idle
nodes to run (release).

On SQLite the store has one node: join and leave write its row, nothing else here runs.

These functions run in the store's database thread, inside the writer's transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import msgspec

from daemon.store import records
from daemon.store.records import QueuedInvocation
from daemon.store.settle import (
    INTERRUPTED_COLUMNS,
    Decide,
    Recovery,
    Route,
    settle_interrupted,
)

# A node's row in GET /v1/nodes, as stored.
NODE_COLUMNS = (
    "node_id, host, pid, started_at, heartbeat_at, lease_s, lease_until, stopped_at, load"
)
# Dead and stopped nodes stay listed this long after their lease ran out.
LISTED_AFTER_S = 3600.0


class TakenOver(msgspec.Struct, frozen=True):
    """What one takeover claimed: from whom, the rows to run, and the running ones settled."""

    node: str | None  # the dead node; None: rows no node owned
    queued: list[QueuedInvocation]  # now this node's, to put in its lanes
    recovery: Recovery  # the rows the dead node left running, settled as recover() settles


def server_now(conn: Any) -> float:
    """The database's clock in Unix seconds: the server's on PostgreSQL, this host's on SQLite."""
    if isinstance(conn, sqlite3.Connection):
        return time.time()
    return float(conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0])


def join(conn: Any, node_id: str, host: str, pid: int, lease_s: float) -> float:
    """Write this node's row as started now, with a fresh lease; returns the database's now.

    On PostgreSQL the row is locked first: a node taking this one's work over holds it, and
    this waits for that takeover to commit, so the recovery that follows sees what is left.
    """
    if not isinstance(conn, sqlite3.Connection):
        conn.execute("SELECT 1 FROM nodes WHERE node_id = ? FOR UPDATE", (node_id,))
    now = server_now(conn)
    conn.execute(
        f"INSERT INTO nodes ({NODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)"
        " ON CONFLICT (node_id) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
        " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,"
        " lease_s = excluded.lease_s, lease_until = excluded.lease_until, stopped_at = NULL,"
        " load = NULL",
        (node_id, host, pid, now, now, lease_s, now + lease_s),
    )
    return now


def heartbeat(conn: Any, node_id: str, lease_s: float, load: dict[str, Any]) -> bool:
    """Renew this node's lease and record its load; False when its row is gone."""
    now = server_now(conn)
    cur = conn.execute(
        "UPDATE nodes SET heartbeat_at = ?, lease_until = ?, lease_s = ?, load = ?"
        " WHERE node_id = ?",
        (now, now + lease_s, lease_s, json.dumps(load, separators=(",", ":")), node_id),
    )
    return bool(cur.rowcount == 1)


def leave(conn: Any, node_id: str) -> None:
    """A clean stop: the lease ends now, so the other nodes take over what is left at once."""
    now = server_now(conn)
    conn.execute(
        "UPDATE nodes SET stopped_at = ?, lease_until = ?, load = NULL WHERE node_id = ?",
        (now, now, node_id),
    )


def list_nodes(conn: Any) -> tuple[float, list[dict[str, Any]]]:
    """(the database's now, the nodes alive or gone within LISTED_AFTER_S), by node id."""
    now = server_now(conn)
    rows = conn.execute(
        f"SELECT {NODE_COLUMNS} FROM nodes WHERE lease_until >= ? ORDER BY node_id",
        (now - LISTED_AFTER_S,),
    ).fetchall()
    return now, [dict(row) for row in rows]


def dead_nodes(conn: Any, node_id: str) -> list[str | None]:
    """The nodes (but `node_id`) whose lease ran out and who still own queued or running
    invocations; None first when rows no node owns wait too. On the reader's connection."""
    now = server_now(conn)
    rows = conn.execute(
        "SELECT n.node_id FROM nodes n WHERE n.lease_until < ? AND n.node_id != ?"
        " AND EXISTS (SELECT 1 FROM invocations i WHERE i.node = n.node_id"
        " AND i.status IN ('queued', 'running'))",
        (now, node_id),
    ).fetchall()
    dead: list[str | None] = [row[0] for row in rows]
    ownerless = conn.execute(
        "SELECT 1 FROM invocations WHERE node IS NULL AND status IN ('queued', 'running') LIMIT 1"
    ).fetchone()
    return [None, *dead] if ownerless else dead


def take_over(
    conn: Any,
    node_id: str,
    dead: str | None,
    free: dict[str, int],
    now: float,
    decide: Decide,
    route: Route | None,
) -> TakenOver:
    """Claim `dead`'s queued and running invocations (None: those no node owns) for `node_id`:
    per function at most `free[function]` of them, oldest first.

    In one transaction: the dead node's row locked (SKIP LOCKED: another node is taking it
    over, or it is starting again) and its lease checked again under that lock, then its rows
    locked (SKIP LOCKED) and given to `node_id`. Running ones are settled as recover() settles
    a crashed attempt (settle.settle_interrupted: a crashed attempt of the dead node's, then a
    retry or a dead letter by the policy), queued ones returned for this node's lanes.
    """
    empty = TakenOver(dead, [], Recovery(requeued=[], crashed=[]))
    if dead is not None:
        row = conn.execute(
            "SELECT lease_until FROM nodes WHERE node_id = ? FOR UPDATE SKIP LOCKED", (dead,)
        ).fetchone()
        if row is None or row[0] >= server_now(conn):
            return empty  # taken over by another node right now, or alive again
    owner = "node = ?" if dead is not None else "node IS NULL"
    ids: list[str] = []
    for function, slots in free.items():
        if slots <= 0:
            continue
        ids += [
            row[0]
            for row in conn.execute(
                f"SELECT id FROM invocations WHERE {owner} AND function = ?"
                " AND status IN ('queued', 'running') ORDER BY queued_at LIMIT ?"
                " FOR UPDATE SKIP LOCKED",
                (*((dead,) if dead is not None else ()), function, slots),
            ).fetchall()
        ]
    if not ids:
        return empty
    claimed = json.dumps(ids)
    running = conn.execute(
        f"SELECT {INTERRUPTED_COLUMNS} FROM invocations"
        " WHERE id IN (SELECT value FROM json_each(?)) AND status = 'running'"
        " ORDER BY queued_at, id",
        (claimed,),
    ).fetchall()
    conn.execute(
        "UPDATE invocations SET node = ? WHERE id IN (SELECT value FROM json_each(?))",
        (node_id, claimed),
    )
    recovery = settle_interrupted(conn, running, now, decide, route)
    queued = [
        QueuedInvocation(**dict(row))
        for row in conn.execute(
            f"SELECT {records.QUEUED_COLUMNS} FROM invocations"
            " WHERE id IN (SELECT value FROM json_each(?)) AND status = 'queued'"
            " ORDER BY queued_at, id",
            (claimed,),
        ).fetchall()
    ]
    return TakenOver(dead, queued, recovery)


def release(conn: Any, ids: list[str]) -> list[str]:
    """Give up this node's queued rows `ids` (no node owns them from now on, for any node to
    take over); the ids released: a row that is no longer queued, or this node's, is kept."""
    cur = conn.execute(
        "UPDATE invocations SET node = NULL WHERE id IN (SELECT value FROM json_each(?))"
        f" AND status = 'queued'{records.OWNED} RETURNING id",
        (json.dumps(ids),),
    )
    return [row[0] for row in cur.fetchall()]
