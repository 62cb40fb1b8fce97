"""Config trigger `type` -> the module and class of that kind (see triggers/base.py).

A kind's module is imported the first time a config uses it, so its library (apscheduler,
aiomqtt, asyncinotify) loads only then; the webhook kind's HTTP serving (daemon/http/webhooks.py,
aiohttp) loads only when its source runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast

from triggers.base import Placed, TriggerKind, TriggerSource

if TYPE_CHECKING:
    from daemon.config import Config

KINDS: dict[str, str] = {
    "cron": "triggers.cron:CronSource",
    "mqtt": "triggers.mqtt:MqttSource",
    "files": "triggers.files:FilesSource",
    "webhook": "triggers.webhook:WebhookSource",
}


def kind(name: str) -> TriggerKind:
    """The source class of kind `name`, imported on first use; KeyError for an unknown kind."""
    module, _, cls = KINDS[name].partition(":")
    return cast(TriggerKind, getattr(importlib.import_module(module), cls))


def triggers_by_kind(config: Config) -> dict[str, list[Placed]]:
    """Every trigger of `config` as (function, trigger id `name#index`, settings), by kind, in
    config order."""
    by_kind: dict[str, list[Placed]] = {}
    for name, fn in config.functions.items():
        for index, trigger in enumerate(fn.triggers):
            by_kind.setdefault(trigger.kind(), []).append((name, f"{name}#{index}", trigger))
    return by_kind


def build_sources(config: Config, store: Any) -> list[TriggerSource]:
    """One source per kind in use, each serving all triggers of its kind."""
    return [
        kind(name)(config, store, triggers) for name, triggers in triggers_by_kind(config).items()
    ]
