"""The contract of a trigger kind, and the supervisor that keeps its source running.

A kind (cron, mqtt, files, webhook) is one module and one line in triggers/registry.py. The module
defines two classes:

- its settings, a TriggerSettings subclass tagged with the kind's `type`: one
  `[[functions.NAME.triggers]]` table, type-checked by msgspec and validated by its own `check`
  (and `check_all` for rules that span triggers);
- its source, a TriggerKind: built as `Source(config, store, triggers)` with every trigger of
  the kind, it is a TriggerSource that serves them all until cancelled.

daemon/config.py decodes and validates trigger tables through the registry, daemon/reload.py
compares what `inputs()` returns, and daemon/sources.py runs the sources; none of them knows a
kind by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Self, runtime_checkable

import msgspec
import structlog

from daemon.backoff import Backoff

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.store.sqlite import Store

log = structlog.get_logger("lambdaemon.triggers")


class TriggerSettings(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"
):
    """One `[[functions.NAME.triggers]]` table; a kind subclasses it with `tag="<kind>"`.

    Fields are the table's keys (TOML types, msgspec constraints); unknown keys are refused.
    The config loader converts a table into the class its `type` names, then calls `check` on
    each trigger, reads every file `secret_files` names, and calls `check_all` once per kind.
    """

    @classmethod
    def kind(cls) -> str:
        """The kind's name: the `type` these settings are tagged with."""
        return str(cls.__struct_config__.tag)

    def check(self, config: Config, key: str) -> None:
        """Raise daemon.errors.ConfigError(config.path, f"{key}.FIELD", reason) when this trigger
        cannot work in `config` (what msgspec's types cannot say: a schedule that does not parse,
        a section the kind needs). `key` is its path, `functions.NAME.triggers[i]`."""

    def secret_files(self) -> dict[str, str]:
        """Secret files this trigger reads, by key path below the trigger (`auth.token_file`).

        The loader refuses a config whose secret cannot be read, and a reload compares their
        content, so a rotated secret reaches the source.
        """
        return {}

    @classmethod
    def check_all(cls, config: Config, triggers: Sequence[Placed]) -> None:
        """Checks that span the triggers of this kind (two webhooks on one route), all given in
        config order; the ConfigError names the later trigger's key, `trigger_key(id).FIELD`."""


# (function name, trigger id `NAME#index`, its settings): how a source is given its triggers.
Placed = tuple[str, str, Any]


def trigger_key(trigger_id: str) -> str:
    """The config key path of trigger `NAME#i`: `functions.NAME.triggers[i]`."""
    function, _, index = trigger_id.rpartition("#")
    return f"functions.{function}.triggers[{index}]"


class Accepted(msgspec.Struct, frozen=True):
    """An event committed as a `queued` invocation (or found already committed)."""

    invocation_id: str
    created: bool  # False when the dedupe key matched an existing invocation


class Emit(Protocol):
    """What a source hands its events to. Every method returns only after the commit."""

    async def __call__(
        self,
        function: str,
        event: Any,
        *,
        trigger: str,
        trigger_id: str,
        dedupe_key: str | None = None,
        cron_fire: tuple[str, str] | None = None,
    ) -> Accepted:
        """Commit `event` (JSON-able, or JSON bytes) as a queued async invocation of `function`.

        `trigger` is the source kind (cron, mqtt, files, webhook); `trigger_id` names the
        trigger (`function#index`). A `dedupe_key` already stored returns the existing id with
        created=False. `cron_fire` (trigger_id, nominal fire time) is marked in the same
        transaction, only when the invocation is new. Raises StoreUnavailableError when nothing
        can be stored: do not acknowledge.
        """
        ...

    async def wait_final(self, invocation_id: str) -> str:
        """Wait until the invocation has a final status (after all retries); return it."""
        ...

    async def invoke_sync(
        self,
        function: str,
        event: bytes,
        *,
        trigger: str,
        trigger_id: str | None = None,
    ) -> tuple[str, Any]:
        """Run a synchronous invocation now; return (invocation id, daemon.models.Outcome).

        Raises daemon.errors.QueueFullError when the function's wait queue is full.
        """
        ...


class Inputs(NamedTuple):
    """What a kind's source is built from, split by what a change to it needs (see `inputs`)."""

    restart: object  # a change stops the running source and starts a new one
    update: object = None  # a change here alone goes to the running source's update()


@runtime_checkable
class TriggerSource(Protocol):
    """The running source of one kind's events, serving every trigger of that kind."""

    name: str
    """The kind's name; the daemon runs one source per kind and knows it by this name."""

    started: asyncio.Event
    """Set once the source serves (listening, subscribed, watching), or has made its first
    attempt and keeps retrying in the background; the daemon reports ready only after that,
    never waiting on a broker. A source may clear it when `run` ends."""

    async def run(self, emit: Emit) -> None:
        """Serve until cancelled, handing each event to `emit`; release everything (sockets,
        watches, tasks) before returning, in `finally`. An exception is logged and the source
        is run again with backoff (see `supervise`); a restart calls `run` on the same object.
        """
        ...


@runtime_checkable
class UpdatableSource(TriggerSource, Protocol):
    """A source that takes a new config in place; its kind's `inputs` has an `update` part."""

    def update(self, new: Self) -> None:
        """From now on serve what `new` (built from the new config, never run) was built with.

        Called on the source the daemon runs, and only when the `restart` part of `inputs` is
        unchanged; never on a source whose kind's `inputs` has no `update` part.
        """
        ...


@runtime_checkable
class TriggerKind(Protocol):
    """A kind's source class, as the registry names it: what the daemon needs before a source
    exists. Implementations are plain classes; the Protocol only states the contract."""

    name: str
    """The kind's name: its settings' tag and its key in the registry."""

    settings: type[TriggerSettings]
    """The kind's settings class, which a trigger table of its `type` is converted into."""

    def __call__(self, config: Config, store: Store, triggers: list[Placed]) -> TriggerSource:
        """Build the source of every trigger of this kind in `config` (config order).

        Does no I/O beyond reading the files the settings name (secrets, TLS), so the daemon
        can build a reloaded config's sources before it stops any; raises ConfigError for
        settings that cannot work. The source starts in `run`.
        """
        ...

    def inputs(self, config: Config, triggers: list[Placed], secrets: Mapping[str, str]) -> Inputs:
        """Everything the source of `triggers` (this kind's, not empty) is built from in
        `config`, for a reload to compare: the triggers, the settings outside them it reads,
        and the digests of the secret files it reads (`secrets`, by key path). Unchanged:
        the running source keeps running; only `update` changed: it gets `update()`;
        otherwise it is restarted. A staticmethod."""
        ...


async def supervise(source: TriggerSource, emit: Emit, *, max_backoff_s: float = 60.0) -> None:
    """Run `source` until cancelled; restart it with capped, jittered backoff when it fails."""
    backoff = Backoff(1.0, max_backoff_s, jitter=(0.5, 1.0))
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await source.run(emit)
            log.warning("trigger_source_returned", source=source.name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("trigger_source_failed", source=source.name, error=repr(exc), exc_info=True)
        if asyncio.get_running_loop().time() - started > 60:
            backoff.reset()  # it ran fine for a while: start the backoff over
        wait = backoff.next()
        log.info("trigger_source_restarting", source=source.name, in_s=round(wait, 2))
        await asyncio.sleep(wait)
