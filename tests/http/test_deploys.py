"""Deploy, publish, aliases and rollback over Lambda's management API, with boto3, against the
real daemon: the code that runs is the code each call names, and it survives a restart."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import Daemon, Gate, free_port, running_daemon, shared_folder, write_config
from tests.http.test_api import lambda_client, refused


def package(marker: str, *, extra: dict[str, str] | None = None) -> bytes:
    """A zip whose handler answers with `marker`, the version it runs as and its event."""
    handler = (
        "import os, time\n"
        "def handler(event, context):\n"
        "    if event.get('gate'):\n"
        "        import fcntl\n"
        "        with open(event['gate']) as f:\n"
        "            fcntl.flock(f, fcntl.LOCK_SH)\n"
        f"    return {{'marker': {marker!r}, 'version': context.function_version,\n"
        "            'env': os.environ['AWS_LAMBDA_FUNCTION_VERSION'],\n"
        "            'arn': context.invoked_function_arn}\n"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("app.py", handler)
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return buffer.getvalue()


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def config_body(tmp_path: Path) -> str:
    code = tmp_path / "initial"
    code.mkdir(exist_ok=True)
    (code / "app.py").write_text(
        "def handler(event, context):\n"
        "    return {'marker': 'config', 'version': context.function_version}\n"
    )
    return (
        f'[functions.app]\nhandler = "app.handler"\ncode = "{code}"\nconcurrency = 2\n'
        "timeout_s = 10\n"
    )


@pytest.fixture
async def daemon(tmp_path):
    async with running_daemon(tmp_path, config_body(tmp_path)) as d:
        yield d


def payload(response: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(response["Payload"].read())
    return body


async def test_deploy_publish_alias_weighted_rollback_cycle_with_boto3(daemon: Daemon):
    v1, v2 = package("one"), package("two")

    def cycle() -> dict[str, Any]:
        client = lambda_client(daemon)
        got: dict[str, Any] = {}
        got["before"] = client.get_function(FunctionName="app")
        got["config_run"] = payload(client.invoke(FunctionName="app"))
        got["deployed"] = client.update_function_code(FunctionName="app", ZipFile=v1)
        got["after_deploy"] = payload(client.invoke(FunctionName="app"))
        got["published1"] = client.publish_version(
            FunctionName="app", CodeSha256=sha256_b64(v1), Description="first"
        )
        got["again"] = client.publish_version(FunctionName="app")  # nothing changed: the same
        got["deployed2"] = client.update_function_code(FunctionName="app", ZipFile=v2, Publish=True)
        got["alias"] = client.create_alias(FunctionName="app", Name="live", FunctionVersion="1")
        live = client.invoke(FunctionName="app", Qualifier="live")
        got["live"], got["live_version"] = payload(live), live["ExecutedVersion"]
        got["by_number"] = payload(client.invoke(FunctionName="app:2"))
        got["latest"] = payload(client.invoke(FunctionName="app"))
        canary = client.update_alias(
            FunctionName="app",
            Name="live",
            RoutingConfig={"AdditionalVersionWeights": {"2": 0.5}},
            RevisionId=got["alias"]["RevisionId"],
        )
        got["canary"] = canary
        runs = []
        for _ in range(60):
            answer = client.invoke(FunctionName="app", Qualifier="live")
            runs.append((answer["ExecutedVersion"], payload(answer)))
        got["runs"] = runs
        got["stale_revision"] = refused(
            lambda: client.update_alias(
                FunctionName="app",
                Name="live",
                FunctionVersion="2",
                RevisionId=got["alias"]["RevisionId"],
            )
        )
        got["promoted"] = client.update_alias(
            FunctionName="app",
            Name="live",
            FunctionVersion="2",
            RoutingConfig={"AdditionalVersionWeights": {}},
        )
        got["versions"] = client.list_versions_by_function(FunctionName="app")["Versions"]
        got["aliases"] = client.list_aliases(FunctionName="app")["Aliases"]
        every = client.get_paginator("list_functions").paginate(
            FunctionVersion="ALL", PaginationConfig={"PageSize": 2}
        )
        got["all"] = [f["FunctionArn"] for page in every for f in page["Functions"]]
        got["by_alias"] = client.get_function(FunctionName="app", Qualifier="live")
        got["in_use"] = refused(lambda: client.delete_function(FunctionName="app", Qualifier="2"))
        got["bad_sha"] = refused(
            lambda: client.publish_version(FunctionName="app", CodeSha256=sha256_b64(b"x"))
        )
        got["stale_code"] = refused(
            lambda: client.update_function_code(
                FunctionName="app", ZipFile=v1, RevisionId="00000000-0000-0000-0000-000000000000"
            )
        )
        return got

    got = await asyncio.to_thread(cycle)
    before = got["before"]["Configuration"]
    assert before["Version"] == "$LATEST" and len(before["CodeSha256"]) == 44
    assert got["config_run"]["marker"] == "config"
    assert got["deployed"]["CodeSha256"] == sha256_b64(v1)
    assert got["deployed"]["CodeSize"] == len(v1)
    assert got["deployed"]["LastUpdateStatus"] == "Successful"
    assert got["deployed"]["RevisionId"] != before["RevisionId"]
    assert got["after_deploy"] == {
        "marker": "one",
        "version": "$LATEST",
        "env": "$LATEST",
        "arn": "arn:aws:lambda:us-east-1:000000000000:function:app",
    }
    p1 = got["published1"]
    assert p1["Version"] == "1" and p1["Description"] == "first"
    assert p1["FunctionArn"].endswith(":function:app:1")
    assert p1["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert got["again"]["Version"] == "1"
    assert got["deployed2"]["Version"] == "2"
    assert got["deployed2"]["CodeSha256"] == sha256_b64(v2)
    assert got["alias"]["AliasArn"].endswith(":function:app:live")
    assert got["live"]["marker"] == "one" and got["live_version"] == "1"
    assert got["live"]["version"] == got["live"]["env"] == "1"
    assert got["live"]["arn"].endswith(":function:app:live")
    assert got["by_number"]["marker"] == "two" and got["by_number"]["version"] == "2"
    assert got["latest"]["marker"] == "two" and got["latest"]["version"] == "$LATEST"
    assert got["canary"]["RoutingConfig"] == {"AdditionalVersionWeights": {"2": 0.5}}
    seen = {version for version, _ in got["runs"]}
    assert seen == {"1", "2"}, seen  # 60 calls at 50%: both (a miss is 2 * 0.5**60)
    markers = {"1": "one", "2": "two"}
    assert all(body["marker"] == markers[v] and body["version"] == v for v, body in got["runs"])
    assert got["stale_revision"]["code"] == "PreconditionFailedException"
    assert got["stale_revision"]["status"] == 412
    assert got["promoted"]["FunctionVersion"] == "2" and "RoutingConfig" not in got["promoted"]
    assert [v["Version"] for v in got["versions"]] == ["$LATEST", "1", "2"]
    assert [a["Name"] for a in got["aliases"]] == ["live"]
    assert [arn.split(":function:")[1] for arn in got["all"]] == ["app", "app:1", "app:2"]
    assert got["by_alias"]["Configuration"]["Version"] == "2"
    assert (
        got["in_use"]["code"] == "ResourceConflictException"
        and "[live]" in (got["in_use"]["message"])
    )
    assert got["bad_sha"]["code"] == "InvalidParameterValueException"
    assert got["stale_code"]["code"] == "PreconditionFailedException"

    # The daemon's own: history (who, what, when) and a rollback of the alias.
    history = await daemon.get("/v1/functions/app/history")
    actions = [h["action"] for h in history["history"]]
    assert actions[:3] == ["update_alias", "update_alias", "create_alias"]
    assert actions.count("deploy") == 2 and actions.count("publish") == 2
    assert all(h["actor"].startswith("Boto3/") for h in history["history"])
    assert daemon.session is not None
    url = f"{daemon.base}/v1/functions/app/aliases/live/rollback"
    async with daemon.session.post(url) as resp:
        rolled = await resp.json()
    assert resp.status == 200 and rolled["FunctionVersion"] == "1"
    status, headers, body = await daemon.invoke("app:live")
    assert json.loads(body)["marker"] == "one" and headers["X-Amz-Executed-Version"] == "1"


async def test_bad_packages_are_modeled_errors_and_change_nothing(daemon: Daemon):
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.py", "x = 1\n")
    oversized = b"\0" * (50 * 1024 * 1024 + 1)

    def calls() -> dict[str, Any]:
        client = lambda_client(daemon)
        return {
            "corrupt": refused(
                lambda: client.update_function_code(FunctionName="app", ZipFile=b"not a zip")
            ),
            "escape": refused(
                lambda: client.update_function_code(FunctionName="app", ZipFile=evil.getvalue())
            ),
            "too_big": refused(
                lambda: client.update_function_code(FunctionName="app", ZipFile=oversized)
            ),
            "s3": refused(
                lambda: client.update_function_code(
                    FunctionName="app", S3Bucket="bucket", S3Key="key"
                )
            ),
            "no_version": refused(
                lambda: client.create_alias(FunctionName="app", Name="live", FunctionVersion="9")
            ),
            "digits": refused(
                lambda: client.create_alias(FunctionName="app", Name="12", FunctionVersion="1")
            ),
            "no_alias": refused(lambda: client.get_alias(FunctionName="app", Name="nope")),
            "unqualified_delete": refused(lambda: client.delete_function(FunctionName="app")),
            "still": payload(client.invoke(FunctionName="app")),
        }

    got = await asyncio.to_thread(calls)
    assert got["corrupt"]["code"] == "InvalidParameterValueException"
    assert "unzip" in got["corrupt"]["message"]
    assert got["escape"]["code"] == "InvalidParameterValueException"
    assert "../escape.py" in got["escape"]["message"]
    assert got["too_big"]["status"] == 413
    assert got["s3"]["code"] == "InvalidParameterValueException"
    assert got["no_version"]["code"] == "ResourceNotFoundException"
    assert got["digits"]["code"] == "InvalidParameterValueException"
    assert got["no_alias"]["code"] == "ResourceNotFoundException"
    assert got["unqualified_delete"]["code"] == "InvalidParameterValueException"
    assert got["still"]["marker"] == "config"
    history = await daemon.get("/v1/functions/app/history")
    assert history["history"] == []


async def test_deployed_code_versions_and_aliases_survive_a_restart(tmp_path: Path):
    daemon = Daemon(write_config(tmp_path, config_body(tmp_path)))
    await daemon.start()
    try:

        def deploy() -> None:
            client = lambda_client(daemon)
            client.update_function_code(FunctionName="app", ZipFile=package("one"), Publish=True)
            client.update_function_code(FunctionName="app", ZipFile=package("two"))
            client.create_alias(FunctionName="app", Name="live", FunctionVersion="1")

        await asyncio.to_thread(deploy)
        await daemon.kill()  # no clean shutdown: what was acknowledged is committed
        await daemon.start()
        answers = {}
        for name in ("app", "app:live", "app:1"):
            status, headers, body = await daemon.invoke(name)
            assert status == 200
            answers[name] = (json.loads(body)["marker"], headers["X-Amz-Executed-Version"])
    finally:
        await daemon.close()
    assert answers == {
        "app": ("two", "$LATEST"),
        "app:live": ("one", "1"),
        "app:1": ("one", "1"),
    }


async def test_a_deploy_lets_calls_in_flight_finish_on_the_old_code(daemon: Daemon, tmp_path):
    gate = Gate(shared_folder(tmp_path) / "gate")
    lambda_client(daemon).update_function_code(FunctionName="app", ZipFile=package("old"))
    in_flight = asyncio.ensure_future(daemon.invoke("app", {"gate": str(gate.path)}))
    await daemon.wait_log("invocation_started", function="app")
    await asyncio.to_thread(
        lambda_client(daemon).update_function_code, FunctionName="app", ZipFile=package("new")
    )
    status, _, body = await daemon.invoke("app")
    assert json.loads(body)["marker"] == "new"
    gate.release()
    status, _, body = await in_flight
    assert status == 200 and json.loads(body)["marker"] == "old"
    # the old code's worker retired once its call ended; its folder is collected after that
    await daemon.wait_log("worker_stopped", function="app", reason="retired")


async def test_a_trigger_targets_an_alias_and_a_rollback_moves_it(tmp_path: Path):
    body = config_body(tmp_path) + (
        '[[functions.app.triggers]]\ntype = "webhook"\npath = "/hook"\nmode = "sync"\n'
        'qualifier = "live"\n'
    )
    hooks = free_port()
    body = f'[webhooks]\nlisten = "127.0.0.1:{hooks}"\n\n' + body
    async with running_daemon(tmp_path, body) as daemon:

        def deploy() -> None:
            client = lambda_client(daemon)
            client.update_function_code(FunctionName="app", ZipFile=package("one"), Publish=True)
            client.update_function_code(FunctionName="app", ZipFile=package("two"), Publish=True)
            client.create_alias(FunctionName="app", Name="live", FunctionVersion="1")
            client.update_alias(FunctionName="app", Name="live", FunctionVersion="2")

        await asyncio.to_thread(deploy)
        assert daemon.session is not None

        async def hook() -> dict[str, Any]:
            async with daemon.session.post(f"http://127.0.0.1:{hooks}/hook", json={}) as resp:
                assert resp.status == 200
                result: dict[str, Any] = await resp.json()
                return result

        assert (await hook())["marker"] == "two"
        async with daemon.session.post(
            f"{daemon.base}/v1/functions/app/aliases/live/rollback"
        ) as resp:
            assert resp.status == 200
        assert (await hook())["marker"] == "one"
        records = await daemon.invocations(function="app")
        assert [r["function_version"] for r in records[:2]] == ["1", "2"]


def test_the_api_refuses_a_zip_over_the_limit_packages_has():
    from daemon import packages
    from daemon.http import management

    assert management.MAX_ZIP_BYTES == packages.MAX_ZIP_BYTES


async def test_versions_beyond_keep_versions_go_unless_an_alias_needs_them(tmp_path: Path):
    async with running_daemon(
        tmp_path, config_body(tmp_path), daemon="keep_versions = 2\n"
    ) as daemon:

        def publish_four() -> list[str]:
            client = lambda_client(daemon)
            for n in range(4):
                client.update_function_code(
                    FunctionName="app", ZipFile=package(f"v{n + 1}"), Publish=True
                )
                if n == 0:
                    client.create_alias(FunctionName="app", Name="old", FunctionVersion="1")
            versions = client.list_versions_by_function(FunctionName="app")["Versions"]
            return [v["Version"] for v in versions]

        assert await asyncio.to_thread(publish_four) == ["$LATEST", "1", "3", "4"]
        status, _, _ = await daemon.invoke("app:2")
        assert status == 404
        status, _, body = await daemon.invoke("app:old")
        assert json.loads(body)["marker"] == "v1"
        history = await daemon.get("/v1/functions/app/history")
        collected = [h for h in history["history"] if h["actor"] == "lambdaemon (keep_versions)"]
        assert [h["detail"]["versions"] for h in collected] == [[2]]
        # the code of version 2 is gone from data_dir; the others' stay
        code = tmp_path / "var" / "code"
        kept = {p.name for p in code.iterdir()}
        assert len(kept) == 3, kept  # versions 1, 3 and 4 ($LATEST is version 4's code)


async def test_a_deleted_versions_warm_worker_stops(daemon: Daemon):
    def publish() -> None:
        client = lambda_client(daemon)
        client.update_function_code(FunctionName="app", ZipFile=package("one"), Publish=True)

    await asyncio.to_thread(publish)
    status, _, _ = await daemon.invoke("app:1")  # a warm worker of version 1
    assert status == 200
    mark = daemon.log_mark()
    await asyncio.to_thread(
        lambda_client(daemon).delete_function, FunctionName="app", Qualifier="1"
    )
    await daemon.wait_log(
        "worker_stopped", since=mark, function="app", version="1", reason="retired"
    )
    status, _, _ = await daemon.invoke("app:1")
    assert status == 404
