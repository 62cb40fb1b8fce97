"""The quick-start config runs as shipped: one working example per trigger kind.

The example is copied with its listeners moved to free ports, its data and inbox into tmp_path
and its broker to a private Mosquitto, so the test never touches the machine's own ports.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import aiohttp

from daemon.config import load_config
from tests.daemon_proc import ROOT, Daemon, free_port
from tests.mosquitto import Mosquitto
from tests.waits import until_changed

EXAMPLE = ROOT / "config" / "example.toml"


def example_copy(tmp_path: Path, broker: Mosquitto) -> tuple[Path, int]:
    text = EXAMPLE.read_text()
    webhook_port = free_port()
    text = text.replace('data_dir = "../var"', 'data_dir = "var"')
    text = text.replace('functions_dir = "../functions"', f'functions_dir = "{ROOT / "functions"}"')
    text = text.replace('path = "../var/inbox"', f'path = "{tmp_path / "inbox"}"')
    text = text.replace('write_paths = ["../var/out"]', f'write_paths = ["{tmp_path / "out"}"]')
    text = text.replace('listen = "127.0.0.1:9070"', f'listen = "127.0.0.1:{free_port()}"')
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{webhook_port}"')
    text = text.replace('url = "mqtt://127.0.0.1:1883"', f'url = "{broker.url}"')
    assert text.count(str(tmp_path)) >= 2 and broker.url in text
    path = tmp_path / "example.toml"
    path.write_text(text)
    return path, webhook_port


async def test_example_config_runs_every_trigger_kind(tmp_path):
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    config, webhook_port = example_copy(tmp_path, broker)
    daemon = Daemon(config)
    await daemon.start()
    try:
        # as shipped, on a host that can (tests/run installs bubblewrap), every one is sandboxed
        sandbox = (await daemon.wait_log("sandbox"))[0]
        assert sandbox["available"] and sandbox["functions"] == sorted(
            load_config(config).functions
        )
        # the Invoke API: hello
        status, _, body = await daemon.invoke("hello", {"name": "edge"})
        assert status == 200 and json.loads(body)["message"] == "hello, edge!"

        # cron: the heartbeat handler with the event its schedule produces
        event = {
            "version": "0",
            "id": "x",
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "time": "2026-01-01T00:00:00Z",
            "resources": ["arn:aws:events:us-east-1:000000000000:rule/heartbeat#0"],
            "detail": {},
        }
        status, _, body = await daemon.invoke("heartbeat", event)
        assert status == 200 and json.loads(body)["scheduled"] == "2026-01-01T00:00:00Z"

        # mqtt: a hot reading raises an alert
        await daemon.wait_log("mqtt_subscribed")
        await asyncio.to_thread(
            subprocess.run,
            [
                "mosquitto_pub",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-t",
                "sensors/kitchen/temperature",
                "-m",
                '{"celsius": 31.5}',
            ],
            check=True,
            timeout=30,
        )
        alert = await daemon.wait_logged(lambda: _final(daemon, "sensor_alert"))
        assert alert["status"] == "succeeded", alert

        # files: a dropped text file is summarised and moved to done/
        inbox = tmp_path / "inbox"
        await until_changed(inbox, lambda: _exists(inbox), what="the inbox")
        (tmp_path / "report.txt").write_text("one two\nthree\n")
        (tmp_path / "report.txt").rename(inbox / "report.txt")
        drop = await daemon.wait_logged(lambda: _final(daemon, "file_drop"))
        assert drop["status"] == "succeeded", drop
        summary = json.loads((tmp_path / "out" / "report.txt.json").read_text())
        assert (summary["words"], summary["lines"]) == (3, 2)
        await daemon.wait_logged(lambda: _done_files(inbox))  # moved, then files_done

        # webhook: the echo route answers with a structured response
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{webhook_port}/echo?x=1", data=b"hi") as resp:
                assert resp.status == 200
                echo = await resp.json()
        assert (echo["method"], echo["path"], echo["query"], echo["body"]) == (
            "POST",
            "/echo",
            {"x": "1"},
            "hi",
        )
    finally:
        await daemon.close()
        broker.stop()


def test_readme_commands_exist_as_shown():
    readme = (ROOT / "README.md").read_text()
    for script in re.findall(r"^\./(\S+)", readme, re.M):
        assert (ROOT / script).is_file(), script
        assert (ROOT / script).stat().st_mode & 0o111, f"{script} is not executable"
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("./tests/run")


async def _final(daemon: Daemon, function: str):
    # Read through the admin API, after the store's barrier: re-checked as the daemon logs.
    rows = await daemon.invocations(function=function)
    return next(
        (r for r in rows if r["status"] in ("succeeded", "failed", "timed_out", "crashed")), None
    )


def _exists(path: Path) -> bool:
    return path.is_dir()


def _done_files(inbox: Path) -> list[Path]:
    return list((inbox / "done").glob("*report.txt")) if (inbox / "done").is_dir() else []
