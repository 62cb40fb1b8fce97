"""plan_reload: what a re-read config changes, as tables of config edits (no daemon needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.reload import plan_reload, secret_digests

ECHO = Path(__file__).resolve().parent / "functions" / "echo"


def config_text(
    *,
    schedule: str = "* * * * *",
    topic: str = "a/#",
    route: str = "/hook",
    webhook_listen: str = "127.0.0.1:8081",
    api_listen: str = "127.0.0.1:9071",
    max_workers: int = 4,
    keepalive_s: int = 30,
    on_failure: str = "",
) -> str:
    return f"""
[daemon]
max_workers = {max_workers}
[api]
listen = "{api_listen}"
[mqtt]
url = "mqtt://127.0.0.1:1883"
password_file = "mqtt.pw"
keepalive_s = {keepalive_s}
[webhooks]
listen = "{webhook_listen}"

[functions.tick]
handler = "handler.handler"
code = "{ECHO}"
{f'on_failure = "{on_failure}"' if on_failure else ""}
triggers = [{{ type = "cron", schedule = "{schedule}" }}]

[functions.sensor]
handler = "handler.handler"
code = "{ECHO}"
triggers = [{{ type = "mqtt", topic = "{topic}" }}]

[functions.hook]
handler = "handler.handler"
code = "{ECHO}"
[[functions.hook.triggers]]
type = "webhook"
path = "{route}"
auth = {{ type = "token", token_file = "hook.token" }}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "mqtt.pw").write_text("pw-1")
    (tmp_path / "hook.token").write_text("token-1")
    return tmp_path


def plan(folder: Path, **edits: object):
    running = folder / "running.toml"
    running.write_text(config_text())
    new = folder / "new.toml"
    new.write_text(config_text(**edits))  # type: ignore[arg-type]
    loaded = load_config(running)
    return plan_reload(loaded, load_config(new), secret_digests(loaded))


@pytest.mark.parametrize(
    ("edits", "stop", "start", "update"),
    [
        ({}, [], [], []),
        ({"schedule": "*/5 * * * *"}, ["cron"], ["cron"], []),
        ({"topic": "b/#"}, ["mqtt"], ["mqtt"], []),
        ({"keepalive_s": 60}, ["mqtt"], ["mqtt"], []),
        ({"route": "/other"}, [], [], ["webhook"]),  # routes swap in place
        ({"webhook_listen": "127.0.0.1:8082"}, ["webhook"], ["webhook"], []),  # a new socket
    ],
)
def test_reload_plan_restarts_only_the_changed_source_kinds(folder, edits, stop, start, update):
    p = plan(folder, **edits)
    assert (p.stop, p.start, p.update) == (stop, start, update)
    assert p.needs_restart == []


def test_reload_plan_notices_rotated_secret_files(folder: Path):
    (folder / "running.toml").write_text(config_text())
    running = load_config(folder / "running.toml")
    secrets = secret_digests(running)  # as the daemon took them when it loaded the file
    (folder / "mqtt.pw").write_text("pw-2")
    (folder / "hook.token").write_text("token-2")
    p = plan_reload(running, load_config(folder / "running.toml"), secrets)
    assert (p.stop, p.start, p.update) == (["mqtt"], ["mqtt"], ["webhook"])
    assert "pw-2" not in repr(p.summary()) and "token-2" not in repr(p.summary())


def test_reload_plan_keeps_restart_only_settings_and_says_so(folder: Path):
    p = plan(folder, api_listen="127.0.0.1:9999", max_workers=2)
    assert p.needs_restart == ["api.listen", "daemon.max_workers"]
    assert (p.config.api.listen, p.config.daemon.max_workers) == ("127.0.0.1:9071", 4)
    assert p.changed == [] and p.settings == []


def test_reload_plan_reports_mqtt_settings_the_destination_publisher_keeps(folder: Path):
    p = plan(folder, keepalive_s=60, on_failure="mqtt:alerts")
    assert p.settings == ["mqtt.keepalive_s"]  # the MQTT source reconnects with it ...
    assert p.needs_restart == ["mqtt.keepalive_s (mqtt: destinations)"]  # ... the outbox later
    assert p.changed == ["tick"] and p.stop == ["mqtt"]
