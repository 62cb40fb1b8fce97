"""A reload that looks like an accident is refused unless forced: a config file with nothing in
it (an editor truncating it mid-save), or one that removes every function. The real daemon;
`lambdaemon reload`, POST /v1/reload and SIGHUP."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.daemon_proc import Daemon, write_config
from tests.test_lifecycle import FUNCS, events, fn_toml, run_cli

TWO = fn_toml("a", FUNCS / "echo") + fn_toml("b", FUNCS / "echo")


async def post_reload(daemon: Daemon, body: bytes = b"{}") -> tuple[int, dict[str, Any]]:
    assert daemon.session is not None
    async with daemon.session.post(f"{daemon.base}/v1/reload", data=body) as resp:
        return resp.status, await resp.json()


async def still_serving(daemon: Daemon, *names: str) -> None:
    for name in names:
        status, _, _ = await daemon.invoke(name, {"still": "there"})
        assert status == 200, name


async def test_reload_of_an_empty_file_is_refused_by_the_api_and_sighup(tmp_path: Path) -> None:
    daemon = Daemon(write_config(tmp_path, TWO))
    await daemon.start()
    try:
        daemon.config.write_text("")  # truncated, as an editor does before writing
        status, answer = await post_reload(daemon)
        assert status == 409 and answer["reloaded"] is False and answer["needs_force"] is True
        assert "has no settings at all" in answer["error"]
        assert "remove every function (a, b)" in answer["error"]
        assert "--force" in answer["error"]
        await still_serving(daemon, "a", "b")

        await daemon.signal(signal.SIGHUP)  # no force for a signal: refused and logged
        refused = await daemon.wait_log("config_reload_refused", 2)
        assert all("has no settings at all" in r["reason"] for r in refused)
        await still_serving(daemon, "a", "b")
        assert events(daemon, "config_reloaded") == []

        daemon.config.write_text("# nothing but a comment\n\n")  # blank all the same
        status, answer = await post_reload(daemon)
        assert status == 409 and "has no settings at all" in answer["error"]
        await still_serving(daemon, "a", "b")
    finally:
        await daemon.close()


async def test_reload_that_removes_every_function_needs_force(tmp_path: Path) -> None:
    daemon = Daemon(write_config(tmp_path, TWO))
    await daemon.start()
    try:
        # The API section stays, so the CLI finds the daemon; every function is gone.
        write_config(tmp_path, "", api_port=daemon.api_port)
        code, out, err = await run_cli(daemon, "reload")
        assert code == 1, (out, err)
        assert "reload refused: the new config removes every function (a, b)" in err
        assert "lambdaemon reload --force" in err
        await still_serving(daemon, "a", "b")

        # Removing some is an ordinary reload.
        write_config(tmp_path, fn_toml("a", FUNCS / "echo"), api_port=daemon.api_port)
        code, out, err = await run_cli(daemon, "reload")
        assert code == 0, (out, err)
        assert "functions removed: b" in out

        write_config(tmp_path, "", api_port=daemon.api_port)
        code, out, err = await run_cli(daemon, "reload", "--force")
        assert code == 0, (out, err)
        assert "functions removed: a" in out
        [forced] = events(daemon, "config_reload_forced")
        assert "removes every function (a)" in forced["reason"]
        status, _, _ = await daemon.invoke("a", {})
        assert status == 404
    finally:
        await daemon.close()


async def test_reload_force_applies_an_empty_file_through_the_api(tmp_path: Path) -> None:
    daemon = Daemon(write_config(tmp_path, TWO))
    await daemon.start()
    try:
        daemon.config.write_text("")
        status, answer = await post_reload(daemon, b'{"force": true}')
        assert status == 200 and answer["reloaded"] is True, answer
        assert answer["functions_removed"] == ["a", "b"]
        assert "api.listen" in answer["needs_restart"]  # kept: the API still answers
        status, answer = await post_reload(daemon, b'{"force": "yes"}')
        assert status == 400 and "invalid body" in answer["error"]
    finally:
        await daemon.close()
