"""Reloading the config: what a re-read config changes, worked out before anything is touched.

plan_reload(running, new, secrets) compares the running config with a freshly loaded (so
validated) one and has no side effects; service.py applies the plan:

- functions added, removed or changed: the dispatcher's lanes take the new settings (running
  invocations finish on the old ones, queued ones stay queued) and the pool retires the workers
  of changed and removed functions;
- trigger sources, one per kind: a kind is restarted when its triggers or the settings it reads
  changed, secret files' content included (a rotated MQTT password or webhook secret applies on
  reload: `secrets` are the running config's secret_digests(), taken when it was loaded); the
  others keep running untouched. Each kind's `inputs()` (triggers/base.py) says what it reads
  and what its source can take in place: the webhook listener takes new routes and limits in
  place and rebinds only when `webhooks.listen` changes;
- settings: those in LIVE apply; any other one (data_dir, max_workers, [api], ...) keeps its
  running value and is reported as needing a restart, never silently ignored. New settings
  count as restart-only until they are listed here. [mqtt] applies to the MQTT source at
  once, and to the outbox's publisher (mqtt: destinations) from the next start.

A reload that looks like an accident is refused unless forced (needs_force): a file with no
settings at all (an editor truncates it while saving) that would change the running config, or
a config that removes every function. `lambdaemon reload --force` applies it anyway; a SIGHUP
cannot be forced.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from daemon.config import Config
from daemon.credentials import read_secret
from daemon.errors import ConfigError
from triggers import registry
from triggers.base import Inputs

# Settings that take effect on reload (whole sections when named alone). The functions table is
# compared function by function; `path` is the file itself.
LIVE = frozenset(
    {
        "daemon.functions_dir",  # code folders: compared as part of each function
        "daemon.region",  # part of each function, and of cron events
        "daemon.shutdown_timeout_s",  # read when the shutdown starts
        "daemon.price_per_request",  # read by each GET /v1/usage
        "daemon.price_per_gb_second",
        "mqtt",  # the MQTT source reconnects with it
        "webhooks",  # in place, or a rebind for `listen`
    }
)
NOT_SETTINGS = ("functions", "path")


class ReloadPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What a reload does; `config` is what runs afterwards (restart-only settings kept)."""

    config: Config
    added: list[str]
    removed: list[str]
    changed: list[str]  # functions whose settings, code folder, env or triggers changed
    stop: list[str]  # source kinds stopped: changed or gone
    start: list[str]  # source kinds started: changed or new
    update: list[str]  # source kinds that take the new config in place (webhook routes)
    settings: list[str]  # changed settings that apply now
    needs_restart: list[str]  # changed settings that keep their running value
    secrets: dict[str, str]  # secret_digests() of `config`, for the next reload

    def summary(self) -> dict[str, Any]:
        """For the config_reloaded log line and the reload API's answer."""
        return {
            "functions_added": self.added,
            "functions_removed": self.removed,
            "functions_changed": self.changed,
            "sources_restarted": sorted(set(self.stop) & set(self.start)),
            "sources_stopped": sorted(set(self.stop) - set(self.start)),
            "sources_started": sorted(set(self.start) - set(self.stop)),
            "sources_updated": self.update,
            "settings": self.settings,
            "needs_restart": self.needs_restart,
        }


def plan_reload(running: Config, new: Config, secrets: dict[str, str]) -> ReloadPlan:
    """Compare the running config (and its `secrets`) with `new`, validated by load_config."""
    fresh = secret_digests(new)
    changed_settings = _changed_settings(running, new)
    token = "api.token_file"
    if secrets.get(token) != fresh.get(token) and token not in changed_settings:
        changed_settings.append(token)  # the same file, a new token
    needs_restart = sorted({k for k in changed_settings if not _live(k)})
    config = _keep(running, new, needs_restart)
    if token in needs_restart:  # still the running one's
        fresh = {k: v for k, v in fresh.items() if k != token} | (
            {token: secrets[token]} if token in secrets else {}
        )
    if _publishes_to_mqtt(config):  # the outbox's publisher keeps its connection settings
        needs_restart += [
            f"{k} (mqtt: destinations)" for k in changed_settings if k.split(".", 1)[0] == "mqtt"
        ]
    old_fns, new_fns = running.functions, config.functions
    stop, start, update = [], [], []
    old_triggers = registry.triggers_by_kind(running)
    new_triggers = registry.triggers_by_kind(config)
    for kind in sorted(old_triggers.keys() | new_triggers.keys()):
        before = _source_inputs(running, kind, old_triggers, secrets)
        after = _source_inputs(config, kind, new_triggers, fresh)
        if before == after:
            continue
        if before is not None and after is not None and before.restart == after.restart:
            update.append(kind)  # its source takes the change in place
            continue
        if before is not None:
            stop.append(kind)
        if after is not None:
            start.append(kind)
    return ReloadPlan(
        config=config,
        added=sorted(set(new_fns) - set(old_fns)),
        removed=sorted(set(old_fns) - set(new_fns)),
        changed=sorted(n for n in set(old_fns) & set(new_fns) if old_fns[n] != new_fns[n]),
        stop=stop,
        start=start,
        update=update,
        settings=sorted(set(changed_settings) - set(needs_restart)),
        needs_restart=needs_restart,
        secrets=fresh,
    )


def needs_force(running: Config, plan: ReloadPlan, *, blank_file: bool) -> str | None:
    """Why applying `plan` is refused unless forced, or None: see the module doc."""
    summary = plan.summary()
    if blank_file and any(summary.values()):
        return (
            f"{running.path} has no settings at all (is an editor saving it?); applying it"
            f" would {_effect(running, plan)}"
        )
    if running.functions and not plan.config.functions:
        return f"the new config removes every function ({', '.join(sorted(running.functions))})"
    return None


def _effect(running: Config, plan: ReloadPlan) -> str:
    if plan.removed and len(plan.removed) == len(running.functions):
        return f"remove every function ({', '.join(plan.removed)})"
    changes = [k for k, v in plan.summary().items() if v]
    return "change " + ", ".join(k.replace("_", " ") for k in changes)


def is_blank(path: str | Path) -> bool:
    """Whether the TOML file at `path` holds no key at all (empty, blanks and comments only)."""
    try:
        return not tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # load_config says what is wrong with it


def secret_digests(config: Config) -> dict[str, str]:
    """Digests of the secret files `config` names, by key path (never the secrets themselves:
    plans are logged). Taken when a config is loaded, so a reload sees a rotated secret."""
    files = {"api.token_file": config.api.token_file}
    if config.mqtt is not None:
        files |= {
            "mqtt.password_file": config.mqtt.password_file,
            "mqtt.ca_file": config.mqtt.ca_file,
        }
    for name, fn in config.functions.items():
        for index, trigger in enumerate(fn.triggers):
            for field, value in trigger.secret_files().items():
                files[f"functions.{name}.triggers[{index}].{field}"] = value
    return {key: _digest(config, value) for key, value in files.items() if value is not None}


def _changed_settings(old: Config, new: Config) -> list[str]:
    keys = []
    for section in Config.__struct_fields__:
        a, b = getattr(old, section), getattr(new, section)
        if section in NOT_SETTINGS or a == b:
            continue
        if isinstance(a, msgspec.Struct) and type(a) is type(b):
            fields = a.__struct_fields__
            keys += [f"{section}.{f}" for f in fields if getattr(a, f) != getattr(b, f)]
        else:
            keys.append(section)  # added, removed, or not a section of fields
    return keys


def _live(key: str) -> bool:
    return key in LIVE or key.split(".", 1)[0] in LIVE


def _keep(running: Config, new: Config, keys: list[str]) -> Config:
    """`new` with each of `keys` set back to its running value."""
    for key in keys:
        section, _, field = key.partition(".")
        value = getattr(running, section)
        if field:
            value = msgspec.structs.replace(getattr(new, section), **{field: getattr(value, field)})
        new = msgspec.structs.replace(new, **{section: value})
    return new


def _publishes_to_mqtt(config: Config) -> bool:
    targets = (t for fn in config.functions.values() for t in (fn.on_success, fn.on_failure))
    return any(t is not None and t.startswith("mqtt:") for t in targets)


def _source_inputs(
    config: Config, kind: str, triggers: dict[str, list[Any]], secrets: dict[str, str]
) -> Inputs | None:
    """What the source of `kind` is built from (triggers/base.py); None when none is needed."""
    if kind not in triggers:
        return None
    return registry.kind(kind).inputs(config, triggers[kind], secrets)


def _digest(config: Config, value: str) -> str:
    try:
        if value.startswith("credential:"):
            data = read_secret(config, value, "").encode()
        else:
            data = config.resolve(value).read_bytes()
    except (ConfigError, OSError):
        return "unreadable"  # the source that needs it says so when it is built
    return hashlib.sha256(data).hexdigest()
