"""A toy trigger kind, `tick`: one event per trigger when its source starts.

A whole kind: this module, and the line `"tick": "tests.triggers.tick:TickSource"` in
triggers/registry.py's KINDS (which test_contract.py adds for the length of a test).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from daemon.errors import ConfigError
from triggers.base import Emit, Inputs, Placed, TriggerSettings


class TickSettings(TriggerSettings, tag="tick", frozen=True):
    message: str = "tick"

    def check(self, config: Any, key: str) -> None:
        if not self.message.strip():
            raise ConfigError(config.path, f"{key}.message", "must not be blank")


class TickSource:
    name = "tick"
    settings = TickSettings

    def __init__(self, config: Any, store: Any, triggers: list[Placed]) -> None:
        self.triggers = triggers
        self.started = asyncio.Event()

    @staticmethod
    def inputs(config: Any, triggers: list[Placed], secrets: Mapping[str, str]) -> Inputs:
        return Inputs(restart=triggers)

    async def run(self, emit: Emit) -> None:
        for function, trigger_id, settings in self.triggers:
            event = {"message": settings.message}
            await emit(function, event, trigger="tick", trigger_id=trigger_id)
        self.started.set()
        await asyncio.Event().wait()  # until cancelled
