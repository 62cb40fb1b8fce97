"""Versions and alias names are ASCII and end where they end: a trailing newline or another
script's digit is refused, not stored as a second spelling of a version (against the real
daemon, through Lambda's API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.daemon_proc import running_daemon
from tests.http.test_api import lambda_client
from tests.http.test_deploys import config_body, package


async def test_a_version_or_alias_spelled_with_a_newline_or_foreign_digit_is_refused(
    tmp_path: Path,
):
    async with running_daemon(tmp_path, config_body(tmp_path)) as daemon:
        client = lambda_client(daemon)
        client.update_function_code(FunctionName="app", ZipFile=package("one"), Publish=True)
        client.update_function_code(FunctionName="app", ZipFile=package("two"), Publish=True)
        base = f"{daemon.base}/2015-03-31/functions/app"
        assert daemon.session is not None
        answers: dict[str, tuple[int, Any]] = {}
        bodies = {
            "newline version": {"Name": "live", "FunctionVersion": "1\n"},
            "arabic digit": {"Name": "live", "FunctionVersion": "1\u0661"},
            "newline name": {"Name": "live\n", "FunctionVersion": "1"},
            "newline weight": {
                "Name": "live",
                "FunctionVersion": "2",
                "RoutingConfig": {"AdditionalVersionWeights": {"1\n": 0.5}},
            },
        }
        for what, body in bodies.items():
            async with daemon.session.post(f"{base}/aliases", json=body) as resp:
                answers[what] = (resp.status, await resp.json())
        async with daemon.session.delete(f"{base}?Qualifier=1") as resp:
            deleted = resp.status
        aliases = client.list_aliases(FunctionName="app")["Aliases"]
    for what, (status, body) in answers.items():
        assert status == 400, (what, body)
        assert body["__type"] == "InvalidParameterValueException", (what, body)
    assert aliases == [] and deleted == 204
