"""The AWS CLI (pip's v1, its real `aws` executable) and `lambdaemon`'s deploy commands, each as
a subprocess against the real daemon: the deploy cycle docs/deploys.md shows, and the refusals."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from tests.daemon_proc import ROOT, Daemon, running_daemon
from tests.http.test_deploys import config_body, package, sha256_b64

AWS = Path(sys.executable).parent / "aws"


def aws_env(daemon: Daemon) -> dict[str, str]:
    """The CLI pointed at the daemon, with dummy credentials and none of this machine's AWS
    settings; one attempt per call, so a refusal is seen once and at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | {
        "AWS_ENDPOINT_URL_LAMBDA": daemon.base,
        "AWS_ACCESS_KEY_ID": "dummy",
        "AWS_SECRET_ACCESS_KEY": "dummy",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_PAGER": "",
    }


async def run(command: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `command`, run from the repository, bounded in time."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def aws(daemon: Daemon, *args: str) -> Any:
    """`aws lambda ARGS --output json`'s answer; the command must succeed."""
    code, out, err = await run([str(AWS), "lambda", *args, "--output", "json"], aws_env(daemon))
    assert code == 0, f"aws lambda {' '.join(args)} exited {code}: {err}"
    return json.loads(out) if out.strip() else None


async def lambdaemon(daemon: Daemon, *args: str) -> tuple[int, str, str]:
    return await run([sys.executable, "-m", "daemon.cli", "--config", str(daemon.config), *args])


def escaping() -> bytes:
    """A zip the CLI sends (it checks only that it is a zip) and the daemon refuses."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("../escape.py", "x = 1\n")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return f"fileb://{path}"


async def test_aws_cli_deploys_publishes_routes_a_canary_and_describes(tmp_path: Path):
    v1, v2 = package("one"), package("two")
    async with running_daemon(tmp_path, config_body(tmp_path)) as daemon:
        deployed = await aws(
            daemon, "update-function-code", "--function-name", "app",
            "--zip-file", write(tmp_path / "v1.zip", v1),
        )  # fmt: skip
        published = await aws(
            daemon, "publish-version", "--function-name", "app", "--description", "first"
        )
        deployed2 = await aws(
            daemon, "update-function-code", "--function-name", "app",
            "--zip-file", write(tmp_path / "v2.zip", v2), "--publish",
        )  # fmt: skip
        alias = await aws(
            daemon, "create-alias", "--function-name", "app", "--name", "live",
            "--function-version", "1",
        )  # fmt: skip
        # the CLI's shorthand syntax, as docs/deploys.md shows it
        canary = await aws(
            daemon, "update-alias", "--function-name", "app", "--name", "live",
            "--function-version", "1", "--routing-config", "AdditionalVersionWeights={2=0.5}",
        )  # fmt: skip
        # Weighted calls until both versions answered: 3 calls on average, 40 at most (both
        # are missed with probability 2 * 0.5**40).
        seen: dict[str, dict[str, Any]] = {}
        for n in range(40):
            out = tmp_path / f"out{n}.json"
            answer = await aws(
                daemon, "invoke", "--function-name", "app", "--qualifier", "live",
                "--payload", '{"from": "aws-cli"}', str(out),
            )  # fmt: skip
            assert answer["StatusCode"] == 200
            seen[answer["ExecutedVersion"]] = json.loads(out.read_text())
            if len(seen) == 2:
                break
        versions = await aws(daemon, "list-versions-by-function", "--function-name", "app")
        by_alias = await aws(
            daemon, "get-function", "--function-name", "app", "--qualifier", "live"
        )
        by_number = await aws(daemon, "get-function", "--function-name", "app", "--qualifier", "2")
        missing = await run(
            [str(AWS), "lambda", "get-alias", "--function-name", "app", "--name", "nope"],
            aws_env(daemon),
        )
        climbs_out = await run(
            [
                str(AWS), "lambda", "update-function-code", "--function-name", "app",
                "--zip-file", write(tmp_path / "bad.zip", escaping()),
            ],
            aws_env(daemon),
        )  # fmt: skip
        rolled = await lambdaemon(daemon, "rollback", "app", "live")
        after = await aws(
            daemon, "invoke", "--function-name", "app", "--qualifier", "live",
            str(tmp_path / "after.json"),
        )  # fmt: skip
        history = await daemon.get("/v1/functions/app/history")

    assert deployed["CodeSha256"] == sha256_b64(v1) and deployed["Version"] == "$LATEST"
    assert deployed["CodeSize"] == len(v1)
    assert published["Version"] == "1" and published["Description"] == "first"
    assert deployed2["Version"] == "2" and deployed2["CodeSha256"] == sha256_b64(v2)
    assert alias["AliasArn"] == "arn:aws:lambda:us-east-1:000000000000:function:app:live"
    assert canary["RoutingConfig"] == {"AdditionalVersionWeights": {"2": 0.5}}
    assert set(seen) == {"1", "2"}
    assert seen["1"]["marker"] == "one" and seen["1"]["version"] == "1"
    assert seen["2"]["marker"] == "two" and seen["2"]["version"] == "2"
    assert seen["2"]["arn"].endswith(":function:app:live")
    assert [v["Version"] for v in versions["Versions"]] == ["$LATEST", "1", "2"]
    assert [v["CodeSha256"] for v in versions["Versions"][1:]] == [sha256_b64(v1), sha256_b64(v2)]
    assert by_alias["Configuration"]["Version"] == "1"
    assert by_alias["Configuration"]["FunctionArn"].endswith(":function:app:live")
    assert by_number["Configuration"]["CodeSha256"] == sha256_b64(v2)
    code, _, err = missing
    assert code != 0 and "ResourceNotFoundException" in err and "app:nope" in err, err
    code, _, err = climbs_out
    assert code != 0 and "InvalidParameterValueException" in err and "../escape.py" in err, err
    code, out, err = rolled
    assert code == 0, err
    assert out.strip() == "arn:aws:lambda:us-east-1:000000000000:function:app:live -> version 1"
    assert after["ExecutedVersion"] == "1"
    assert json.loads((tmp_path / "after.json").read_text())["marker"] == "one"
    actors = {h["action"]: h["actor"] for h in history["history"]}
    assert actors["deploy"].startswith("aws-cli/") and actors["update_alias"].startswith("aws-cli/")
    assert actors["rollback"].startswith("lambdaemon-cli from 127.0.0.1")


def folder(path: Path, marker: str) -> str:
    path.mkdir()
    (path / "app.py").write_text(
        "def handler(event, context):\n"
        f"    return {{'marker': {marker!r}, 'version': context.function_version}}\n"
    )
    return str(path)


async def test_lambdaemon_deploy_versions_alias_rollback_history(tmp_path: Path):
    async with running_daemon(tmp_path, config_body(tmp_path)) as daemon:
        got = {
            "deploy1": await lambdaemon(
                daemon, "deploy", "app", folder(tmp_path / "one", "one"), "--publish"
            ),
            "deploy2": await lambdaemon(
                daemon, "deploy", "app", folder(tmp_path / "two", "two"), "--publish"
            ),
            "alias": await lambdaemon(daemon, "alias", "app", "live", "1"),
            "canary": await lambdaemon(daemon, "alias", "app", "live", "1", "--weight", "2=0.5"),
            "versions": await lambdaemon(daemon, "versions", "app"),
            "versions_json": await lambdaemon(daemon, "--json", "versions", "app"),
            "drop_canary": await lambdaemon(daemon, "rollback", "app", "live"),
            "promote": await lambdaemon(daemon, "alias", "app", "live", "2"),
            "back": await lambdaemon(daemon, "rollback", "app", "live"),
            "no_further": await lambdaemon(daemon, "rollback", "app", "live"),
            "history": await lambdaemon(daemon, "--json", "history", "app"),
            "history_table": await lambdaemon(daemon, "history", "app"),
            # refusals
            "no_share": await lambdaemon(daemon, "alias", "app", "live", "1", "--weight", "2"),
            "too_much": await lambdaemon(daemon, "alias", "app", "live", "1", "--weight", "2=1.5"),
            "not_a_number": await lambdaemon(
                daemon, "alias", "app", "live", "1", "--weight", "2=half"
            ),
            "latest_canary": await lambdaemon(
                daemon, "alias", "app", "live", "$LATEST", "--weight", "2=0.1"
            ),
            "unknown_deploy": await lambdaemon(
                daemon, "deploy", "nosuch", str(tmp_path / "one"), "--publish"
            ),
            "unknown_versions": await lambdaemon(daemon, "versions", "nosuch"),
            "unknown_alias": await lambdaemon(daemon, "alias", "nosuch", "live", "1"),
            "unknown_rollback": await lambdaemon(daemon, "rollback", "app", "nope"),
            "unknown_history": await lambdaemon(daemon, "history", "nosuch"),
            "unreadable": await lambdaemon(daemon, "deploy", "app", str(tmp_path / "none.zip")),
        }
        status, headers, body = await daemon.invoke("app:live")
    for step in ("deploy1", "deploy2", "alias", "canary", "versions", "drop_canary", "back"):
        assert got[step][0] == 0, (step, got[step])
    assert got["deploy1"][1].startswith("deployed app: version 1, CodeSha256 ")
    assert got["deploy2"][1].startswith("deployed app: version 2, CodeSha256 ")
    arn = "arn:aws:lambda:us-east-1:000000000000:function:app:live"
    assert got["alias"][1] == f"{arn} -> version 1\n"
    assert got["canary"][1] == f"{arn} -> version 1, 0.5 to version 2\n"
    table = {line.split()[0]: line for line in got["versions"][1].splitlines()[1:]}
    assert set(table) == {"$LATEST", "1", "2"}
    assert " live " in table["1"] and "live(0.5)" in table["2"]
    listed = json.loads(got["versions_json"][1])
    assert [v["Version"] for v in listed["versions"]] == ["$LATEST", "1", "2"]
    assert got["drop_canary"][1] == f"{arn} -> version 1\n"
    assert got["promote"][1] == f"{arn} -> version 2\n"
    assert got["back"][1] == f"{arn} -> version 1\n"
    assert status == 200 and headers["X-Amz-Executed-Version"] == "1"
    assert json.loads(body)["marker"] == "one"
    code, _, err = got["no_further"]
    assert code == 1 and "ResourceConflictException" in err and "no earlier version" in err
    history = json.loads(got["history"][1])
    assert [h["action"] for h in history] == [
        "rollback", "update_alias", "rollback", "update_alias", "create_alias",
        "publish", "deploy", "publish", "deploy",
    ]  # fmt: skip
    assert {h["actor"] for h in history} == {"lambdaemon-cli from 127.0.0.1"}
    assert history[0]["version"] == "1" and history[0]["previous"] == "2"
    assert got["history_table"][1].splitlines()[0].split() == [
        "AT", "ACTION", "VERSION", "ALIAS", "PREVIOUS", "ACTOR",
    ]  # fmt: skip
    for step in ("no_share", "too_much", "not_a_number"):
        code, out, err = got[step]
        assert code == 64 and "is not VERSION=SHARE" in err and out == "", (step, err)
    code, _, err = got["latest_canary"]
    assert code == 1 and "InvalidParameterValueException" in err and "$LATEST" in err
    for step in ("unknown_deploy", "unknown_versions", "unknown_alias", "unknown_history"):
        code, out, err = got[step]
        assert code == 1 and "ResourceNotFoundException: Function not found" in err, (step, err)
        assert "nosuch" in err and out == ""
    code, _, err = got["unknown_rollback"]
    assert code == 1 and "ResourceNotFoundException: Alias not found" in err and "app:nope" in err
    code, _, err = got["unreadable"]
    assert code == 65 and "cannot read" in err and "none.zip" in err


async def test_lambdaemon_rollback_to_a_collected_version_says_so(tmp_path: Path):
    body = config_body(tmp_path)
    async with running_daemon(tmp_path, body, daemon="keep_versions = 2\n") as daemon:
        steps = []
        for n in (1, 2, 3):
            code = folder(tmp_path / f"v{n}", f"v{n}")
            steps.append(await lambdaemon(daemon, "deploy", "app", code, "--publish"))
            steps.append(await lambdaemon(daemon, "alias", "app", "live", str(n)))
        # version 1 went once version 3 came: no alias named it any more
        back = await lambdaemon(daemon, "rollback", "app", "live")
        further = await lambdaemon(daemon, "rollback", "app", "live")
        pages = {}
        assert daemon.session is not None
        for query in ("limit=2", "before=abc", "before=0", f"before={2**64}", "limit=x"):
            url = f"{daemon.base}/v1/functions/app/history?{query}"
            async with daemon.session.get(url) as resp:
                pages[query] = (resp.status, await resp.json())
        _, first = pages["limit=2"]
        async with daemon.session.get(
            f"{daemon.base}/v1/functions/app/history?limit=2&before={first['next']}"
        ) as resp:
            second = await resp.json()
    assert all(code == 0 for code, _, _ in steps), steps
    assert back[0] == 0 and back[1].endswith("-> version 2\n"), back
    code, out, err = further
    assert code == 1 and out == "" and "ResourceConflictException" in err, err
    assert "named version 1 before, and that version is deleted (keep_versions = 2" in err
    assert [h["action"] for h in first["history"]] == ["rollback", "update_alias"]
    assert [h["action"] for h in second["history"]] == ["delete_version", "publish"]
    for query in ("before=abc", "before=0", f"before={2**64}"):
        status, refusal = pages[query]
        assert status == 400 and "before is a history entry's id" in refusal["message"], query
    status, refusal = pages["limit=x"]
    assert status == 400 and "limit is an integer from 1 to 1000" in refusal["message"]
