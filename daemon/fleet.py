"""This daemon as a node of a fleet: its lease, its fence, and the work it takes over.

A fleet is several daemons on one PostgreSQL store (docs/store.md); daemon/store/fleet.py holds
the rows. A Node here:
- joins at start (its `nodes` row renewed, before the dispatcher recovers its own rows);
- renews its lease every third of `lease_s` (a heartbeat, with its load for GET /v1/nodes);
- fences itself: once it has not renewed its lease for two thirds of `lease_s` (the store is
  unreachable, or this process stalled), it starts no new attempt until a renewal succeeds, so
  that it has stopped starting before the others may find its lease run out and take its work
  over. An attempt already running goes on; if the lease does run out meanwhile, another node
  may run that invocation again (at least once), and the late outcome is refused: a node writes
  only the invocations it owns;
- every CHECK_S looks for dead nodes (lease run out) that still own work, and takes over as
  much of it as its lanes have free slots for: crashed attempts recorded for what was running,
  then all of it queued in its own lanes;
- shares its backlog: at each heartbeat, what waits in a lane beyond KEEP_PER_SLOT per
  concurrency slot is released, up to the free slots the other live nodes reported, as rows
  no node owns; a node with free slots takes them over as it takes a dead node's work (this
  one too, once it has room again). A released invocation is out of this node's lanes before
  its row is released, and a node starts only what it owns, so it never runs twice;
- leaves at a clean stop: its lease ends at once, so the others take its queued work over.

On SQLite the store has one node: it joins and leaves (its row for /v1/nodes), nothing more.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from typing import TYPE_CHECKING

import structlog

from daemon.errors import StoreUnavailableError

if TYPE_CHECKING:
    from daemon.dispatcher import Dispatcher
    from daemon.store.sqlite import Store

log = structlog.get_logger("lambdaemon.fleet")

CHECK_S = 0.5  # how often a node looks for dead nodes' work


class Node:
    """This daemon's membership of its store's fleet; see the module doc."""

    def __init__(self, store: Store, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self._valid_until = 0.0  # time.monotonic() at which the last renewed lease ends
        self._fenced = False
        self._failures = 0

    @property
    def node_id(self) -> str:
        return self.store.node_id

    def fenced(self) -> bool:
        """Whether this node must start nothing now: its lease has not been renewed lately."""
        return self.store.fleet and time.monotonic() > self._valid_until - self.lease_s / 3

    async def join(self) -> None:
        """Renew this node's row and lease; before the dispatcher recovers its rows."""
        sent = time.monotonic()
        await self.store.join(socket.gethostname(), os.getpid(), self.lease_s)
        self._valid_until = sent + self.lease_s
        log.info("node_joined", node_id=self.node_id, lease_s=self.lease_s)

    async def leave(self) -> None:
        try:
            await self.store.leave()
        except StoreUnavailableError as exc:  # its lease runs out by itself
            log.warning("node_leave_not_recorded", node_id=self.node_id, error=str(exc))

    async def run(self, dispatcher: Dispatcher) -> None:
        """Heartbeats and takeovers until cancelled (a fleet's store only)."""
        if not self.store.fleet:
            return
        beat_s = self.lease_s / 3
        next_beat = time.monotonic() + beat_s
        while True:
            self._check_fence()  # first: after a stall, before anything renews the lease
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + beat_s
                await self._beat(dispatcher)
            self._check_fence()
            if not self.fenced():
                try:
                    await self._take_over(dispatcher)
                except StoreUnavailableError as exc:
                    log.warning("node_takeover_failed", node_id=self.node_id, error=str(exc))
                except Exception:  # a bug: said loudly, and the heartbeats go on
                    log.exception("node_takeover_failed", node_id=self.node_id)
            await asyncio.sleep(max(0.0, min(CHECK_S, next_beat - time.monotonic())))

    async def _beat(self, dispatcher: Dispatcher) -> None:
        sent = time.monotonic()
        try:
            renewed = await self.store.heartbeat(self.lease_s, dispatcher.load())
            if not renewed:  # its row was deleted by hand: written again
                await self.store.join(socket.gethostname(), os.getpid(), self.lease_s)
        except Exception as exc:  # the store is away (StoreUnavailableError), or a bug
            self._failures += 1
            if self._failures == 1:
                log.warning("node_lease_not_renewed", node_id=self.node_id, error=str(exc))
            return
        self._failures = 0
        self._valid_until = sent + self.lease_s
        await self._share(dispatcher)

    async def _share(self, dispatcher: Dispatcher) -> None:
        """Release what waits here beyond a few per slot to the other live nodes' free slots
        (as of their last heartbeat): its rows, no node's now, go to whichever node takes
        them over first (_take_over), this one included once it has room again."""
        try:
            now, nodes = await self.store.list_nodes()
        except StoreUnavailableError:
            return
        except Exception:  # a bug: said loudly, and the heartbeats go on
            log.exception("node_share_failed", node_id=self.node_id)
            return
        spare: dict[str, int] = {}
        for row in nodes:
            if row["node_id"] == self.node_id or row["stopped_at"] is not None:
                continue
            if row["lease_until"] < now or not row["load"]:
                continue
            for function, load in json.loads(row["load"])["functions"].items():
                spare[function] = spare.get(function, 0) + load["free"]
        if not any(spare.values()):
            return
        taken = dispatcher.release_excess(spare)
        if not taken:
            return
        try:
            released = set(await self.store.release([item.id for _, item in taken]))
        except Exception as exc:  # kept, all of them: one the store did release after all is
            released = set()  # not this node's to start (it owns it no more), so none runs twice
            log.warning("node_release_failed", node_id=self.node_id, error=str(exc))
        dispatcher.put_back([(fn, item) for fn, item in taken if item.id not in released])
        if released:
            log.info("node_work_released", node_id=self.node_id, released=len(released))

    def _check_fence(self) -> None:
        fenced = self.fenced()
        if fenced != self._fenced:
            self._fenced = fenced
            if fenced:
                log.error(
                    "node_fenced",
                    node_id=self.node_id,
                    reason="its lease was not renewed: no new attempt starts until it is",
                )
            else:
                log.info("node_unfenced", node_id=self.node_id)

    async def _take_over(self, dispatcher: Dispatcher) -> None:
        dead = await self.store.dead_nodes()
        for node in dead:
            free = dispatcher.free_slots()
            if not any(free.values()):
                return
            taken = await self.store.take_over(
                node, free, dispatcher.recovery_policy(time.time()), dispatcher.router
            )
            if taken.queued or taken.recovery.crashed or taken.recovery.dead_lettered:
                dispatcher.adopt(taken)
                log.info(
                    "node_work_taken_over",
                    node_id=self.node_id,
                    dead_node=node,
                    queued=len(taken.queued),
                    requeued_after_crash=len(taken.recovery.requeued),
                    crashed=len(taken.recovery.crashed),
                    dead_lettered=len(taken.recovery.dead_lettered),
                )
