"""Config loading: the example loads; every kind of mistake names file, key path and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "functions" / "hello"
FN = f'[functions.a]\nhandler = "handler.handler"\ncode = "{HELLO}"\n'


def test_config_example_loads():
    config = load_config(ROOT / "config" / "example.toml")
    assert "hello" in config.functions
    hello = config.functions["hello"]
    assert hello.name == "hello"
    assert Path(hello.code) == HELLO
    assert hello.env == {"GREETING": "hello"}
    assert config.data_dir.is_absolute()
    # async retries default to Lambda's: 2 retries, 6 hours of age
    assert (hello.retries, hello.retry_backoff_s) == (2, (1.0, 60.0))
    assert hello.max_event_age_s == 21600.0


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ('[daemon]\nmax_workers = "four"\n', "daemon.max_workers", "Expected `int`, got `str`"),
        ("[daemon]\nmax_workers = 0\n", "daemon.max_workers", ">= 1"),
        ("[daemon]\nbogus = 1\n", "daemon.bogus", "unknown key"),
        ("[bogus]\nx = 1\n", "bogus", "unknown key"),
        (FN + "timeout_s = -1\n", "functions.a.timeout_s", "> 0"),
        (FN + "memory_mb = 1\n", "functions.a.memory_mb", ">= 16"),
        (FN + "colour = 1\n", "functions.a.colour", "unknown key"),
        (FN + "env = { PORT = 80 }\n", "functions.a.env.PORT", "must be a string"),
        (
            FN + 'env = { AWS_LAMBDA_FUNCTION_NAME = "x" }\n',
            "functions.a.env.AWS_LAMBDA_FUNCTION_NAME",
            "reserved",
        ),
        (FN + "min_warm = 3\nconcurrency = 2\n", "functions.a.min_warm", "more than concurrency"),
        (FN + "retries = 11\n", "functions.a.retries", "<= 10"),
        (FN + "retries = -1\n", "functions.a.retries", ">= 0"),
        (FN + "retry_backoff_s = [60, 1]\n", "functions.a.retry_backoff_s", "more than the cap"),
        (FN + "retry_backoff_s = [0, 1]\n", "functions.a.retry_backoff_s[0]", "> 0"),
        (FN + "retry_backoff_s = [1]\n", "functions.a.retry_backoff_s", "length 2"),
        (FN + "max_event_age_s = 0.5\n", "functions.a.max_event_age_s", ">= 1"),
        (
            f'[functions.a]\nhandler = "handler.nope"\ncode = "{HELLO}"\n',
            "functions.a.handler",
            "defines no 'nope'",
        ),
        (
            f'[functions.a]\nhandler = "missing.handler"\ncode = "{HELLO}"\n',
            "functions.a.handler",
            "module 'missing' not found",
        ),
        (
            f'[functions.a]\nhandler = "handler"\ncode = "{HELLO}"\n',
            "functions.a.handler",
            "module.function",
        ),
        (
            '[functions.a]\nhandler = "handler.handler"\ncode = "/nonexistent"\n',
            "functions.a.code",
            "does not exist",
        ),
        (f'[functions.a]\ncode = "{HELLO}"\n', "functions.a.handler", "required key is missing"),
        ('[functions."bad name"]\nhandler = "h.h"\n', "functions.bad name", "function names"),
        (
            '[api]\nlisten = "0.0.0.0:9070"\n',
            "api.token_file",
            "required when api.listen is not a loopback",
        ),
        ('[api]\nlisten = "nowhere"\n', "api.listen", "is not host:port"),
        ('[api]\ntoken_file = "missing.token"\n', "api.token_file", "cannot read"),
        (
            FN + '[[functions.a.triggers]]\ntype = "kafka"\n',
            "functions.a.triggers[0].type",
            "unknown type 'kafka'",
        ),
        (
            FN + '[[functions.a.triggers]]\ntype = "cron"\nschedule = "61 * * * *"\n',
            "functions.a.triggers[0].schedule",
            "61",
        ),
        (
            FN + '[[functions.a.triggers]]\ntype = "cron"\nschedule = "rate(5 minute)"\n',
            "functions.a.triggers[0].schedule",
            "'rate(5 minute)': EventBridge rate(value unit) syntax: unit 'minute' with value 5",
        ),
        (
            FN + '[[functions.a.triggers]]\ntype = "cron"\nschedule = "cron(0 9 15W * ? *)"\n',
            "functions.a.triggers[0].schedule",
            "EventBridge cron(minutes hours day-of-month month day-of-week year) syntax:"
            " day-of-month field '15W': '15W' (W, the nearest weekday) is not supported",
        ),
        (
            FN
            + '[[functions.a.triggers]]\ntype = "cron"\nschedule = "* * * * *"\ntimezone = "Mars/Olympus"\n',
            "functions.a.triggers[0].timezone",
            "unknown time zone",
        ),
        (
            FN + '[[functions.a.triggers]]\ntype = "mqtt"\ntopic = "a/b"\n',
            "functions.a.triggers[0]",
            "[mqtt] section",
        ),
        (
            FN + '[mqtt]\n[[functions.a.triggers]]\ntype = "mqtt"\ntopic = "a/#/b"\n',
            "functions.a.triggers[0].topic",
            "not a valid MQTT topic filter",
        ),
        (
            FN
            + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/x"\nauth = { type = "hmac" }\n',
            "functions.a.triggers[0].auth.secret_file",
            "required key is missing",
        ),
        (FN + '[mqtt]\nurl = "http://broker"\n', "mqtt.url", "is not mqtt://host"),
        (
            FN + '[[functions.a.triggers]]\ntype = "files"\npath = "in"\npattern = "sub/*.txt"\n',
            "functions.a.triggers[0].pattern",
            "matches file names, not paths",
        ),
        (
            FN + f'[[functions.a.triggers]]\ntype = "files"\npath = "{HELLO / "handler.py"}"\n',
            "functions.a.triggers[0].path",
            "is not a folder",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/x"\n'
            'methods = ["POST"]\n'
            '[[functions.a.triggers]]\ntype = "webhook"\npath = "/x"\nmethods = ["GET", "POST"]\n',
            "functions.a.triggers[1].path",
            "POST /x is already routed by functions.a.triggers[0]",
        ),
        (  # /api/* is /api/{proxy+}; an omitted `methods` is ANY
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/api/*"\n'
            '[[functions.a.triggers]]\ntype = "webhook"\npath = "/api/{proxy+}"\n',
            "functions.a.triggers[1].path",
            "ANY /api/{proxy+} is already routed by functions.a.triggers[0]",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/api/{rest+}"\n'
            'methods = ["GET"]\n'
            '[[functions.a.triggers]]\ntype = "webhook"\npath = "/api/{proxy+}"\n'
            'methods = ["GET"]\n',
            "functions.a.triggers[1].path",
            "GET /api/{proxy+} is already routed by functions.a.triggers[0]",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/a/{proxy+}/b"\n',
            "functions.a.triggers[0].path",
            "a greedy {proxy+} or * must be the last segment",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/a/*/b"\n',
            "functions.a.triggers[0].path",
            "a greedy {proxy+} or * must be the last segment",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/api*"\n',
            "functions.a.triggers[0].path",
            "'api*' is not a segment a route can match",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/a/{id}"\n',
            "functions.a.triggers[0].path",
            "'{id}' is not a segment a route can match",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/x"\n'
            'methods = ["POST", "FETCH"]\n',
            "functions.a.triggers[0].methods",
            "'FETCH' is not an HTTP method a route can take (ANY, DELETE, GET",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/x"\n'
            'cors = { allow_origins = ["*"], allow_methods = ["get"] }\n',
            "functions.a.triggers[0].cors.allow_methods",
            "'get' is not an HTTP method",
        ),
        (
            FN + '[webhooks]\n[[functions.a.triggers]]\ntype = "webhook"\npath = "/x"\n'
            'payload_format = "3.0"\n',
            "functions.a.triggers[0].payload_format",
            "",
        ),
    ],
)
def test_config_error_names_key_and_reason(tmp_path, body, key, reason):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key, str(info.value)
    assert reason in info.value.reason, str(info.value)
    assert str(path.name) in str(info.value)


def test_config_invalid_toml_names_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\nmax_workers = \n")
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2"):
        load_config(path)


def test_config_relative_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "fns" / "a").mkdir(parents=True)
    (tmp_path / "fns" / "a" / "main.py").write_text(
        "async def run(event, context):\n    return 1\n"
    )
    path = tmp_path / "sub" / "c.toml"
    path.parent.mkdir()
    path.write_text(
        '[daemon]\ndata_dir = "data"\nfunctions_dir = "../fns"\n[functions.a]\nhandler = "main.run"\n'
    )
    config = load_config(path)
    assert config.data_dir == tmp_path / "sub" / "data"
    assert Path(config.functions["a"].code) == tmp_path / "fns" / "a"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_cli_check_and_run_exit_78_on_bad_config(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\nmax_workers = -2\n")
    for command in ("check", "run"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 78
        assert f"{path}: daemon.max_workers:" in result.stderr
    assert not (tmp_path / "var").exists()  # nothing was started


def test_cli_config_from_environment_then_default(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("nonsense")
    import os

    env = {**os.environ, "LAMBDAEMON_CONFIG": str(path)}
    assert run_cli("check", env=env).returncode == 78
    env.pop("LAMBDAEMON_CONFIG")
    result = run_cli("check", env=env)
    assert result.returncode == 0, result.stderr
    assert "example.toml: ok" in result.stdout


def test_config_wheelhouse_is_a_folder_relative_to_the_config(tmp_path):
    (tmp_path / "wheels").mkdir()
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nwheelhouse = "wheels"\n')
    assert load_config(path).wheelhouse_dir == (tmp_path / "wheels").resolve()
    path.write_text("")
    assert load_config(path).wheelhouse_dir is None
    path.write_text('[daemon]\nwheelhouse = "missing"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    missing = (tmp_path / "missing").resolve()
    assert (caught.value.key, caught.value.reason) == (
        "daemon.wheelhouse",
        f"folder {missing} does not exist",
    )


def test_config_node_id_is_the_host_name_unless_set(tmp_path):
    import socket

    path = tmp_path / "config.toml"
    path.write_text("")
    assert load_config(path).node_id == socket.gethostname()
    path.write_text('[daemon]\nnode_id = "edge-2.site"\n[store]\nlease_s = 4\n')
    config = load_config(path)
    assert (config.node_id, config.store.lease_s) == ("edge-2.site", 4.0)
    for bad in ("", "a b", "-x", "x" * 64):
        path.write_text(f'[daemon]\nnode_id = "{bad}"\n')
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.key == "daemon.node_id", bad
    path.write_text("[store]\nlease_s = 0.5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "store.lease_s"


@pytest.mark.parametrize("key", ["name", "region", "version", "deps"])
def test_config_refuses_what_the_daemon_fills_in(tmp_path, key):
    path = tmp_path / "config.toml"
    path.write_text(FN + f'{key} = "x"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.key, caught.value.reason) == (f"functions.a.{key}", "unknown key")


def test_cli_check_names_the_function_whose_runtime_cannot_run(tmp_path):
    """`lambdaemon check` exits 78 naming the function and why: an unknown runtime, a missing
    or non-executable bootstrap, a Node.js handler without Node.js or without its module."""
    import os

    code = tmp_path / "code"
    code.mkdir()
    (code / "index.js").write_text("exports.handler = async () => 1;\n")
    path = tmp_path / "config.toml"

    def check(runtime: str, handler: str = "index.handler", env=None) -> str:
        path.write_text(
            f'[functions.fn1]\nhandler = "{handler}"\ncode = "{code}"\nruntime = "{runtime}"\n'
        )
        result = run_cli("check", "--config", str(path), env=env)
        assert result.returncode == 78, result.stdout
        return result.stderr

    assert "functions.fn1.runtime: unknown runtime 'java'" in check("java")
    assert "bootstrap: missing" in check("provided")
    (code / "bootstrap").write_text("#!/bin/sh\n")
    assert "bootstrap: not executable" in check("provided")
    assert "functions.fn1.handler: module other.js or other.mjs or other.cjs not found" in check(
        "nodejs", "other.handler"
    )
    no_node = {**os.environ, "PATH": str(tmp_path / "empty")}
    assert "functions.fn1.runtime: runtime 'nodejs' needs Node.js" in check("nodejs", env=no_node)
    (code / "bootstrap").chmod(0o755)
    path.write_text(f'[functions.fn1]\nhandler = "x.y"\ncode = "{code}"\nruntime = "provided"\n')
    assert run_cli("check", "--config", str(path)).returncode == 0
