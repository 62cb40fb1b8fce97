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
import base64
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, Protocol, Self, runtime_checkable

import msgspec
import structlog
from msgspec import Meta

from daemon.backoff import Backoff
from daemon.errors import ConfigError, EventRejectedError
from daemon.untrusted import MAX_JSON_DEPTH

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

    # The version or alias of the function this trigger invokes (None: $LATEST); resolved when
    # an event is accepted (daemon/versions.py), so a rollback is one alias update.
    qualifier: str | None = None

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


MAX_BATCH_SIZE = 10_000  # Lambda's BatchSize ceiling for queue and stream sources
MAX_BATCH_WINDOW_S = 300.0  # ... and its MaximumBatchingWindowInSeconds ceiling


class BatchedTriggerSettings(TriggerSettings, frozen=True, kw_only=True):
    """A kind whose events may run in batches, as Lambda's event source mappings deliver them.

    With `batch_size` > 1 the dispatcher hands the handler `{"Records": [event, ...]}`: up to
    `batch_size` of this trigger's waiting events, waiting at most `batch_window_s` from the
    first for more (daemon/batches.py). 1 (the default) runs each event on its own.
    """

    batch_size: Annotated[int, Meta(ge=1, le=MAX_BATCH_SIZE)] = 1
    batch_window_s: Annotated[float, Meta(ge=0, le=MAX_BATCH_WINDOW_S)] = 0.0

    def check(self, config: Config, key: str) -> None:
        if self.batch_window_s > 0 and self.batch_size == 1:
            reason = "a batch window needs batch_size > 1 (one event per invocation waits for none)"
            raise ConfigError(config.path, f"{key}.batch_window_s", reason)


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


EVENT_REJECTED = "EventRejected"  # error type and dead-letter reason of a rejected input
MAX_REJECTED_RAW_BYTES = 64 * 1024  # of a rejected input's bytes, kept with its record
_json = msgspec.json.Encoder()


def encode_event(build: Callable[[], Any]) -> bytes:
    """The JSON of the event `build()` returns; EventRejectedError when there can be none.

    Whatever fails while the event is built or encoded (a payload nested too deep, text that
    is not valid Unicode, a value JSON cannot hold) is a fault of that one input, never of the
    source: it becomes the rejection's reason, and the source goes on.
    """
    try:
        return _json.encode(build())
    except EventRejectedError:
        raise
    except RecursionError:
        raise EventRejectedError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except Exception as exc:
        raise EventRejectedError(f"cannot build the event: {exc}") from exc


async def emit_built(
    emit: Emit,
    function: str,
    build: Callable[[], Any],
    *,
    raw: Callable[[], bytes],
    trigger: str,
    trigger_id: str,
    dedupe_key: str | None = None,
    cron_fire: tuple[str, str] | None = None,
    details: Callable[[], Mapping[str, Any]] | None = None,
) -> Accepted:
    """Emit the event `build()` returns, or, when it cannot be built, `emit.reject()` the input
    (`raw()` its bytes, `details()` what identifies it) with the reason: the source acknowledges
    either, so one bad input never holds up the ones behind it. Raises what `emit` raises."""
    try:
        body = encode_event(build)
    except EventRejectedError as exc:
        return await emit.reject(
            function,
            raw(),
            trigger=trigger,
            trigger_id=trigger_id,
            error=str(exc),
            dedupe_key=dedupe_key,
            cron_fire=cron_fire,
            details=details() if details is not None else None,
        )
    return await emit(
        function,
        body,
        trigger=trigger,
        trigger_id=trigger_id,
        dedupe_key=dedupe_key,
        cron_fire=cron_fire,
    )


def rejected_event(raw: bytes, details: Mapping[str, Any] | None) -> bytes:
    """The event a rejected input is recorded with: `details` plus its first bytes, base64."""
    kept = raw[:MAX_REJECTED_RAW_BYTES]
    about = {str(k): printable(v) for k, v in (details or {}).items()}
    event = {
        "raw": base64.b64encode(kept).decode("ascii"),
        "raw_encoding": "base64",
        "raw_bytes": len(raw),
        "raw_truncated": len(kept) < len(raw),
    }
    try:
        return _json.encode({**about, **event})
    except Exception:  # details that cannot be JSON: keep their text only
        return _json.encode({**{k: repr(v) for k, v in about.items()}, **event})


def printable(value: Any) -> Any:
    """`value`, but a str with lone surrogates (a file name that is not UTF-8) `\\udcXX`-escaped:
    valid for JSON and SQLite, and unchanged when it already was."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


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

    async def reject(
        self,
        function: str,
        raw: bytes,
        *,
        trigger: str,
        trigger_id: str,
        error: str,
        dedupe_key: str | None = None,
        cron_fire: tuple[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Accepted:
        """Commit an input that cannot become an event (see `emit_built`) instead of it.

        Recorded as a failed, dead-lettered invocation of `function` that never ran, with the
        error and an event that holds `details` (JSON-able: topic, file name) and `raw` (the
        input's bytes, base64, cut at MAX_REJECTED_RAW_BYTES). Committed like `__call__`
        (same dedupe and cron_fire rules, StoreUnavailableError when nothing can be stored),
        so the source acknowledges the input and goes on with the next one.
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
