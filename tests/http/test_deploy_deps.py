"""A deployed package with a requirements.txt, through Lambda's API against the real daemon: pip
installs it offline from `[daemon] wheelhouse`, two functions and two versions of one function
import conflicting pins side by side, and a failed pip run leaves what runs untouched.
(tests/test_packages.py covers build_environment itself.)"""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from tests.daemon_proc import Daemon, running_daemon
from tests.http.test_api import lambda_client
from tests.http.test_deploys import payload, sha256_b64
from tests.wheels import pinme_wheelhouse

FUNCTIONS = """
[functions.a]
handler = "app.handler"
code = "{code}"
timeout_s = 10
[functions.b]
handler = "app.handler"
code = "{code}"
timeout_s = 10
"""


def pinned(requirement: str) -> bytes:
    """A zip whose handler says which pinme it imported, from where, and the requirement."""
    handler = (
        "import pinme\n"
        "def handler(event, context):\n"
        "    return {'pinme': pinme.VERSION, 'file': pinme.__file__,\n"
        f"            'wants': {requirement!r}, 'version': context.function_version}}\n"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("app.py", handler)
        zf.writestr("requirements.txt", f"{requirement}\n")
    return buffer.getvalue()


async def test_deployed_requirements_come_from_the_wheelhouse_pin_by_pin(tmp_path: Path):
    wheelhouse = pinme_wheelhouse(tmp_path / "wheels")
    code = tmp_path / "initial"
    code.mkdir()
    (code / "app.py").write_text("def handler(event, context):\n    return {'pinme': None}\n")
    body = FUNCTIONS.format(code=code)
    async with running_daemon(tmp_path, body, daemon=f'wheelhouse = "{wheelhouse}"') as daemon:
        got = await asyncio.to_thread(deploy_and_call, daemon)
        envs = sorted(p.name for p in (tmp_path / "var" / "envs").iterdir())
        history = await daemon.get("/v1/functions/a/history")
        logged = [e for e in daemon.log_events() if e.get("event") == "environment_built"]

    one, two = got["a:1"], got["a:2"]
    assert (one["pinme"], two["pinme"], got["b"]["pinme"]) == ("1.0", "2.0", "1.0")
    assert (one["version"], two["version"]) == ("1", "2")
    # each pin in its own folder under data_dir/envs; b's requirements are a:1's, so one folder
    assert one["file"] == got["b"]["file"] != two["file"]
    for answer in (one, two):
        assert answer["file"].startswith(str(tmp_path / "var" / "envs") + "/")
    assert len(envs) == 2 and len(logged) == 2
    # a:1 still imports 1.0 after a:2 (2.0) ran: each version's workers have their own path
    assert got["a:1 again"]["pinme"] == "1.0"

    # A requirement the wheelhouse cannot meet: refused with pip's own words, nothing changed.
    refused = got["unmet"]
    assert refused["code"] == "InvalidParameterValueException" and refused["status"] == 400
    assert refused["message"].startswith("pip could not install requirements.txt: ")
    assert "No matching distribution found for pinme==3.0" in refused["message"]
    assert "from versions: 1.0, 2.0" in refused["message"]
    assert got["latest after"] == {**two, "version": "$LATEST"}
    assert got["sha after"] == got["sha before"] == sha256_b64(got["deployed"])
    assert [v["Version"] for v in got["versions after"]] == ["$LATEST", "1", "2"]
    assert [h["action"] for h in history["history"]].count("deploy") == 2
    assert len(envs) == 2  # the failed build left no folder


def deploy_and_call(daemon: Daemon) -> dict[str, Any]:
    client = lambda_client(daemon)
    got: dict[str, Any] = {}
    client.update_function_code(FunctionName="a", ZipFile=pinned("pinme==1.0"), Publish=True)
    client.update_function_code(FunctionName="b", ZipFile=pinned("pinme==1.0"))
    got["deployed"] = pinned("pinme==2.0")
    client.update_function_code(FunctionName="a", ZipFile=got["deployed"], Publish=True)
    for name in ("a:1", "a:2", "b", "a:1 again"):
        got[name] = payload(client.invoke(FunctionName=name.split()[0]))
    got["sha before"] = client.get_function(FunctionName="a")["Configuration"]["CodeSha256"]
    try:
        client.update_function_code(FunctionName="a", ZipFile=pinned("pinme==3.0"), Publish=True)
    except ClientError as exc:
        got["unmet"] = {
            "code": exc.response["Error"]["Code"],
            "status": exc.response["ResponseMetadata"]["HTTPStatusCode"],
            "message": exc.response["Error"]["Message"],
        }
    got["latest after"] = payload(client.invoke(FunctionName="a"))
    got["sha after"] = client.get_function(FunctionName="a")["Configuration"]["CodeSha256"]
    got["versions after"] = client.list_versions_by_function(FunctionName="a")["Versions"]
    return got
