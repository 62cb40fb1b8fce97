"""Powertools' pydantic parser models accept the webhook events lambdaemon makes, through the real
daemon: a handler ported from Lambda that validates its event with `parse(event, Model)` runs.

(The data classes of these events are covered with the routes in test_webhook_routes.py, the
S3 and EventBridge models with the files and cron sources.)
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.daemon_proc import free_port, running_daemon

MODELS = Path(__file__).resolve().parent / "functions" / "webhook_models"


def body_toml(port: int) -> str:
    def function(name: str) -> str:
        return f'handler = "handler.{name}"\ncode = "{MODELS}"\nmemory_mb = 1024'

    return f"""
[webhooks]
listen = "127.0.0.1:{port}"

[functions.url]
{function("v2")}
triggers = [{{ type = "webhook", path = "/api/{{proxy+}}" }}]

[functions.rest]
{function("v1")}
triggers = [{{ type = "webhook", path = "/rest/{{proxy+}}", payload_format = "1.0" }}]
"""


async def test_webhook_events_parse_with_powertools_pydantic_models(tmp_path: Path) -> None:
    port = free_port()
    async with running_daemon(tmp_path, body_toml(port)) as daemon:
        await daemon.wait_log("webhook_listening", timeout_s=10)
        assert daemon.session is not None
        base = f"http://127.0.0.1:{port}"
        text = {"Content-Type": "text/plain"}  # a text body is not base64-encoded
        async with daemon.session.post(
            f"{base}/api/items/7?x=1&x=2", data=b"hi", headers=text
        ) as resp:
            v2 = json.loads(await resp.read()) if resp.status == 200 else await resp.text()
        async with daemon.session.get(f"{base}/rest/a/b%20c?q=1&q=2") as resp:
            v1 = json.loads(await resp.read()) if resp.status == 200 else await resp.text()
    assert v2 == {
        "method": "POST",
        "raw_path": "/api/items/7",
        "query": {"x": "1,2"},
        "body": "hi",
        "route_key": "ANY /api/{proxy+}",
        "path_parameters": {"proxy": "items/7"},
        "source_ip": "127.0.0.1/32",
    }
    assert v1 == {
        "method": "GET",
        "resource": "/rest/{proxy+}",
        "path": "/rest/a/b%20c",
        "path_parameters": {"proxy": "a/b c"},
        "multi_query": {"q": ["1", "2"]},
        "body": None,
        "source_ip": "127.0.0.1/32",
    }
