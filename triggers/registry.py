"""Config trigger `type` -> the source that serves every trigger of that kind."""

from __future__ import annotations

import importlib
from typing import Any

from daemon.config import (
    Config,
    CronTriggerConfig,
    FilesTriggerConfig,
    MqttTriggerConfig,
    WebhookTriggerConfig,
)
from triggers.base import TriggerSource

# Each source kind is imported only when a config uses it, so its library loads only then.
SOURCES: dict[type, tuple[str, str]] = {
    CronTriggerConfig: ("triggers.cron", "CronSource"),
    MqttTriggerConfig: ("triggers.mqtt", "MqttSource"),
    FilesTriggerConfig: ("triggers.files", "FilesSource"),
    WebhookTriggerConfig: ("triggers.webhook", "WebhookSource"),
}


def build_sources(config: Config, store: Any) -> list[TriggerSource]:
    """One source per kind in use, each serving all triggers of its kind.

    A source is built as `Source(config, store, triggers)`, where `triggers` lists
    (function name, trigger id `name#index`, trigger config) in config order.
    """
    by_kind: dict[type, list[tuple[str, str, Any]]] = {}
    for name, fn in config.functions.items():
        for index, trigger in enumerate(fn.triggers):
            by_kind.setdefault(type(trigger), []).append((name, f"{name}#{index}", trigger))
    sources: list[TriggerSource] = []
    for kind, triggers in by_kind.items():
        module, cls = SOURCES[kind]
        sources.append(getattr(importlib.import_module(module), cls)(config, store, triggers))
    return sources
