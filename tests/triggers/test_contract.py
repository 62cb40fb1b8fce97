"""The trigger contract (triggers/base.py): every registered kind keeps it, and a kind defined
outside the package (tests/triggers/tick.py) works through the real loader and daemon."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from daemon.config import load_config
from daemon.dispatcher import Dispatcher
from daemon.errors import ConfigError
from daemon.pool import WorkerPool
from daemon.reload import secret_digests
from daemon.service import Service
from daemon.store.sqlite import Store
from tests.daemon_proc import write_config
from triggers import registry
from triggers.base import TriggerKind, TriggerSource, UpdatableSource

OK = Path(__file__).resolve().parents[1] / "functions" / "ok"
FUNCTION = f'[functions.ok]\nhandler = "handler.handler"\ncode = "{OK}"\n'
# A trigger of each kind that does nothing while the test runs, and the section it needs.
MINIMAL = {
    "cron": 'type = "cron"\nschedule = "0 0 1 1 *"\n',
    "mqtt": 'type = "mqtt"\ntopic = "contract/#"\n',
    "files": 'type = "files"\npath = "inbox"\n',
    "webhook": 'type = "webhook"\npath = "/contract"\n',
}
SECTIONS = {"mqtt": '[mqtt]\nurl = "{broker}"\n', "webhook": '[webhooks]\nlisten = "127.0.0.1:0"\n'}


@pytest.fixture
def tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers tests/triggers/tick.py: the one registry line a new kind needs."""
    monkeypatch.setitem(registry.KINDS, "tick", "tests.triggers.tick:TickSource")


def open_fds(store: Path) -> dict[str, str]:
    """This process's open file descriptors and what each is, but the store's files."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass  # the one listdir() itself used
    return {fd: path for fd, path in fds.items() if not path.startswith(str(store))}


@pytest.mark.parametrize("kind", list(registry.KINDS))
async def test_trigger_source_keeps_the_contract(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    broker = request.getfixturevalue("mosquitto").url if kind == "mqtt" else ""
    section = SECTIONS.get(kind, "").format(broker=broker)
    body = f"{section}{FUNCTION}[[functions.ok.triggers]]\n{MINIMAL[kind]}"
    config = load_config(write_config(tmp_path, body))
    source_class = registry.kind(kind)
    assert isinstance(source_class, TriggerKind)
    assert source_class.name == source_class.settings.kind() == kind
    triggers = registry.triggers_by_kind(config)[kind]
    inputs = source_class.inputs(config, triggers, secret_digests(config))
    db = tmp_path / "db.sqlite"
    async with Store.open(db) as store:
        dispatcher = Dispatcher(store, WorkerPool(1), config.functions)
        tasks, fds = asyncio.all_tasks(), open_fds(db)
        source = source_class(config, store, triggers)
        assert isinstance(source, TriggerSource)
        assert source.name == kind
        # Only a kind whose inputs have an `update` part is asked to take a config in place.
        assert isinstance(source, UpdatableSource) == (inputs.update is not None)
        running = asyncio.create_task(source.run(dispatcher))
        async with asyncio.timeout(10):
            await source.started.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert {t for t in asyncio.all_tasks() - tasks if not t.done()} == set()
        assert open_fds(db) == fds  # sockets, watches, pipes: all closed


async def test_a_kind_from_one_module_and_one_registry_line_fires_in_the_daemon(
    tmp_path: Path, tick: None
) -> None:
    body = f'{FUNCTION}[[functions.ok.triggers]]\ntype = "tick"\nmessage = "hello"\n'
    config = load_config(write_config(tmp_path, body))
    service = Service(config)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        async with asyncio.timeout(30):
            await service.ready.wait()  # ready once every source started: the tick is stored
        api = f"http://{config.api.listen}/v1/invocations"
        async with aiohttp.ClientSession() as http:
            async with http.get(api, params={"function": "ok"}) as response:
                (listed,) = (await response.json())["invocations"]
            assert service.dispatcher is not None
            async with asyncio.timeout(30):
                assert await service.dispatcher.wait_final(listed["id"]) == "succeeded"
            async with http.get(f"{api}/{listed['id']}") as response:
                record = await response.json()
        assert (record["trigger"], record["trigger_id"]) == ("tick", "ok#0")
        assert record["event"] == {"message": "hello"}
    finally:
        stop.set()
        await running


def test_a_kind_validates_its_own_settings(tmp_path: Path, tick: None) -> None:
    body = f'{FUNCTION}[[functions.ok.triggers]]\ntype = "tick"\nmessage = " "\n'
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    assert info.value.key == "functions.ok.triggers[0].message"
    assert info.value.reason == "must not be blank"
