"""Config trigger `type` -> the source that serves every trigger of that kind."""

from __future__ import annotations

from typing import Any

from daemon.config import Config, CronTriggerConfig
from triggers.base import TriggerSource


def build_sources(config: Config, store: Any, dispatcher: Any) -> list[TriggerSource]:
    """The sources this config needs: one per kind, each serving all triggers of its kind."""
    by_kind: dict[type, list[tuple[str, str, Any]]] = {}
    for name, fn in config.functions.items():
        for index, trigger in enumerate(fn.triggers):
            by_kind.setdefault(type(trigger), []).append((name, f"{name}#{index}", trigger))
    sources: list[TriggerSource] = []
    if CronTriggerConfig in by_kind:
        from triggers.cron import CronSource

        sources.append(CronSource(store, by_kind[CronTriggerConfig]))
    return sources
