"""The sandbox's walls, each tried from inside a handler (functions/walls), and the same
handler outside the sandbox, where each attempt succeeds: real bwrap, real workers.

The functions come from a real config file (load_config), laid out as a deployment is: the
config folder holds the token (a secret), data_dir with its database, and the functions folder
with this function's code and another's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.bubblewrap import SANDBOX_UID, unavailable
from daemon.config import FunctionConfig, load_config
from daemon.models import Status
from daemon.pool import WorkerPool
from tests.daemon_proc import Daemon, write_config
from tests.pool.conftest import FUNCTIONS, function, request
from tests.pool.test_runtimes import API, NODE_CJS
from tests.test_config import run_cli
from tests.waits import until

WALLS = FUNCTIONS / "walls"


def deployment(tmp_path: Path, sandbox: bool, **settings: Any) -> dict[str, FunctionConfig]:
    """The config folder (token, data_dir and its database, two functions), loaded."""
    folder = tmp_path / "etc"
    for name in ("walls", "other"):
        shutil.copytree(WALLS, folder / "functions" / name)
    (folder / "token").write_text("s3cret-token\n")
    (folder / "var").mkdir()
    sqlite3.connect(folder / "var" / "lambdaemon.db").close()
    lines = [
        f'[daemon]\ndata_dir = "var"\nfunctions_dir = "functions"\nsandbox = {str(sandbox).lower()}'
    ]
    lines.append('[api]\ntoken_file = "token"')
    for name in ("walls", "other"):
        extra = "".join(f"\n{key} = {json.dumps(value)}" for key, value in settings.items())
        lines.append(f'[functions.{name}]\nhandler = "handler.handler"{extra}')
    lines.append('[[functions.walls.triggers]]\ntype = "files"\npath = "inbox"')
    (folder / "inbox").mkdir()
    (folder / "inbox" / "dropped.txt").write_text("a dropped file\n")
    (folder / "lambdaemon.toml").write_text("\n\n".join(lines) + "\n")
    return load_config(folder / "lambdaemon.toml").functions


async def call(pool: WorkerPool, fn: FunctionConfig, **event: Any) -> Any:
    outcome = await pool.invoke(fn, request(fn, json.dumps(event).encode()))
    assert outcome.status is Status.SUCCEEDED, (outcome.payload, outcome.logs)
    return json.loads(outcome.payload)


def test_this_host_can_run_the_sandbox() -> None:
    assert unavailable() is None  # tests/run installs bubblewrap; every test below needs it


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "plain"])
async def test_files_outside_the_function_are_out_of_reach(
    tmp_path: Path, make_pool: Callable[..., Any], sandbox: bool
) -> None:
    functions = deployment(tmp_path, sandbox, tmp_mb=8)
    fn, folder = functions["walls"], tmp_path / "etc"
    assert fn.sandbox is sandbox
    pool = await make_pool(functions=functions)
    assert (await call(pool, fn, action="echo", value=7))["echo"] == 7
    reachable = not sandbox
    for path in ("lambdaemon.toml", "token", "var/lambdaemon.db", "functions/other/handler.py"):
        answer = await call(pool, fn, action="read", path=str(folder / path))
        assert answer["ok"] is reachable, (path, answer)
    for path in ("var", "functions/other", str(Path(__file__).parent)):
        answer = await call(pool, fn, action="list", path=str(folder / path))
        assert answer["ok"] is reachable, (path, answer)
    # Its own code is there, read-only, and its file-drop trigger's folder; the system too;
    # only /tmp takes writes.
    assert (await call(pool, fn, action="read", path=str(folder / "inbox/dropped.txt")))["ok"]
    assert (await call(pool, fn, action="read", path=f"{fn.code}/handler.py"))["ok"]
    assert (await call(pool, fn, action="read", path="/etc/hostname"))["ok"] or not sandbox
    for path in (f"{fn.code}/new.txt", "/etc/lambdaemon-test", "/usr/lambdaemon-test"):
        answer = await call(pool, fn, action="write", path=path)
        if sandbox:
            assert answer["errno"] == 30, answer  # EROFS
    assert (await call(pool, fn, action="write", path="/tmp/fits", mb=4))["ok"]
    beyond = await call(pool, fn, action="write", path="/tmp/too-big", mb=12)  # tmp_mb = 8
    assert beyond["ok"] is reachable and (reachable or beyond["errno"] == 28), beyond  # ENOSPC


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "plain"])
async def test_no_root_no_privileges_and_only_its_own_environment(
    tmp_path: Path, make_pool: Callable[..., Any], sandbox: bool
) -> None:
    functions = deployment(tmp_path, sandbox)
    pool = await make_pool(functions=functions)
    me = await call(pool, functions["walls"], action="self")
    expected = {
        "_HANDLER", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_REGION", "LAMBDA_RUNTIME_DIR",
        "LAMBDA_TASK_ROOT", "LANG", "PATH", "TZ",
    }  # fmt: skip
    # bwrap's --chdir sets PWD, as a shell would.
    assert set(me["env"]) - {"PWD"} == expected, me["env"]
    if not sandbox:
        assert me["ppid"] != 1 and me["uid"] == os.getuid()
        return
    assert me["ppid"] == 1  # the sandbox's init, in its own PID namespace
    assert me["no_new_privs"] == "1" and int(me["cap_eff"], 16) == 0
    if os.getuid() == 0:  # a root daemon's workers are not root
        assert me["uid"] == me["euid"] == SANDBOX_UID and me["groups"] == []
    else:
        assert me["uid"] == os.getuid()


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "plain"])
async def test_proc_shows_no_other_worker(
    tmp_path: Path, make_pool: Callable[..., Any], sandbox: bool
) -> None:
    functions = deployment(tmp_path, sandbox)
    pool = await make_pool(functions=functions)
    assert (await call(pool, functions["other"], action="echo"))["pid"]  # warm, alongside
    pids = (await call(pool, functions["walls"], action="processes"))["pids"]
    if sandbox:
        assert pids == [1, 2]  # bwrap's init and this worker: nothing of the host's
    else:
        assert len(pids) > 2 and os.getpid() in pids


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "plain"])
async def test_namespaces_of_its_own(
    tmp_path: Path, make_pool: Callable[..., Any], sandbox: bool
) -> None:
    functions = deployment(tmp_path, sandbox, network=False)
    pool = await make_pool(functions=functions)
    inside = await call(pool, functions["walls"], action="namespaces")
    outside = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in inside}
    # PID, IPC, UTS, mount, and with network = false the network: none is the host's.
    assert all((inside[kind] != outside[kind]) is sandbox for kind in inside), (inside, outside)
    other = await call(pool, functions["other"], action="namespaces")
    assert (other["ipc"] != inside["ipc"] and other["pid"] != inside["pid"]) is sandbox


@pytest.mark.parametrize("network", [True, False], ids=["host-network", "network-false"])
async def test_network_false_cannot_reach_the_hosts_loopback(
    tmp_path: Path, make_pool: Callable[..., Any], network: bool
) -> None:
    accepted = 0

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        functions = deployment(tmp_path, True, network=network)
        pool = await make_pool(functions=functions)
        answer = await call(pool, functions["walls"], action="connect", host="127.0.0.1", port=port)
        assert answer["ok"] is network, answer
        if network:
            await until(lambda: accepted == 1, what="the server to see the connection")
        else:
            assert answer["errno"] == 111 and accepted == 0  # ECONNREFUSED: its own loopback
    finally:
        server.close()
        await server.wait_closed()


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


async def test_a_setsid_grandchild_is_gone_after_the_timeout(
    tmp_path: Path, make_pool: Callable[..., Any]
) -> None:
    functions = deployment(tmp_path, True, timeout_s=2.0)
    fn = functions["walls"]
    pool = await make_pool(functions=functions)
    marker = f"lambdaemon-detached-{os.urandom(4).hex()}"
    call_task = asyncio.create_task(
        pool.invoke(fn, request(fn, json.dumps({"action": "detach", "marker": marker}).encode()))
    )
    grandchild = (await until(lambda: _processes_with(marker), what="the grandchild"))[0]
    # In the sandbox's PID namespace, not ours: its end comes with the namespace's.
    assert os.readlink(f"/proc/{grandchild}/ns/pid") != os.readlink("/proc/self/ns/pid")
    outcome = await call_task
    assert outcome.status is Status.TIMED_OUT, outcome.payload
    await until(lambda: not _processes_with(marker), timeout_s=5, what="the grandchild's end")


@pytest.mark.parametrize("runtime", ["provided", "nodejs"])
async def test_runtime_workers_run_sandboxed_too(
    make_pool: Callable[..., Any], runtime: str
) -> None:
    if runtime == "provided":
        fn = function("rt", "function.handler", API, runtime="provided", sandbox=True)
        event: dict[str, Any] = {"do": "echo"}
    else:
        fn = function("node", "index.handler", NODE_CJS, runtime="nodejs", sandbox=True)
        event = {"do": "echo"}
    pool = await make_pool()
    outcome = await pool.invoke(fn, request(fn, json.dumps(event).encode()))
    assert outcome.status is Status.SUCCEEDED, (outcome.payload, outcome.logs)
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    assert outcome.worker_pid in pids  # bwrap, the process the pool kills


async def test_private_paths_inside_the_system_are_covered(
    make_pool: Callable[..., Any],
) -> None:
    # As a config in /etc/lambdaemon would be: /etc is shown, the daemon's folder in it is not.
    fn = function("w", "handler.handler", WALLS, sandbox=True, hidden=("/etc/ssl",))
    pool = await make_pool()
    answer = await call(pool, fn, action="list", path="/etc/ssl")
    assert answer == {"ok": True, "value": []}, answer
    assert (await call(pool, fn, action="list", path="/etc"))["ok"]
    assert os.listdir("/etc/ssl")  # there on the host


def test_check_names_the_function_that_needs_a_missing_bubblewrap(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "handler.py").write_text("def handler(event, context):\n    return 1\n")
    path = tmp_path / "config.toml"
    fn = '[functions.fenced]\nhandler = "handler.handler"\ncode = "code"\n'
    env = {**os.environ, "PATH": str(tmp_path)}  # no bwrap on it
    path.write_text(fn + "sandbox = true\n")
    result = run_cli("check", "--config", str(path), env=env)
    assert result.returncode == 78, result.stdout
    assert f"{path}: functions.fenced.sandbox: function fenced needs a sandbox" in result.stderr
    assert "bubblewrap is not installed" in result.stderr
    path.write_text(fn + "[daemon]\nsandbox = true\n")
    result = run_cli("check", "--config", str(path), env=env)
    assert result.returncode == 78 and "daemon.sandbox: function fenced" in result.stderr
    path.write_text(fn)  # the default (auto): off without bwrap, and check says why
    result = run_cli("check", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert "sandbox: not available: bubblewrap is not installed" in result.stdout
    assert "every function runs without one" in result.stdout
    result = run_cli("check", "--config", str(path))  # ... and on where it can be
    assert result.returncode == 0 and "sandbox: available; sandboxed: fenced" in result.stdout
    path.write_text(fn + "sandbox = false\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0 and "sandbox: available; sandboxed: none" in result.stdout
    path.write_text(fn + '[daemon]\nsandbox = "auto"\n')
    result = run_cli("check", "--config", str(path), env=env)
    assert result.returncode == 0 and "every function runs without one" in result.stdout


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "plain"])
async def test_read_paths_and_write_paths_are_shown_at_their_own_path(
    tmp_path: Path, make_pool: Callable[..., Any], sandbox: bool
) -> None:
    shared, out = tmp_path / "shared", tmp_path / "out"  # out: created for a sandboxed worker
    (shared / "maps").mkdir(parents=True)
    if not sandbox:
        out.mkdir()  # a plain worker sees the host: its handler may create what it needs
    (shared / "maps" / "a.txt").write_text("a map\n")
    (tmp_path / "beside").mkdir()
    functions = deployment(tmp_path, sandbox, read_paths=[str(shared)], write_paths=[str(out)])
    fn = functions["walls"]
    assert (fn.read_paths, fn.write_paths) == ((str(shared),), (str(out),))
    pool = await make_pool(functions=functions)
    assert (await call(pool, fn, action="read", path=str(shared / "maps" / "a.txt")))["ok"]
    written = await call(pool, fn, action="write", path=str(shared / "new.txt"))
    assert written["ok"] is not sandbox and (not sandbox or written["errno"] == 30), written
    assert (await call(pool, fn, action="keep", path=str(out / "result.txt")))["ok"]
    assert (out / "result.txt").read_text() == "kept\n"  # on the host, at the same path
    if sandbox and os.getuid() == 0:  # the worker (nobody) owns what it wrote, and the folder
        assert (out / "result.txt").stat().st_uid == out.stat().st_uid == SANDBOX_UID
    beside = await call(pool, fn, action="list", path=str(tmp_path / "beside"))
    assert beside["ok"] is not sandbox, beside  # only the paths named are shown


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "plain"])
async def test_a_worker_that_dies_of_a_signal_is_reported_so(
    tmp_path: Path, make_pool: Callable[..., Any], sandbox: bool
) -> None:
    functions = deployment(tmp_path, sandbox)
    fn = functions["walls"]
    pool = await make_pool(functions=functions)
    for event, status in (({"signal": 11}, (None, 11)), ({"exit": 3}, (3, None))):
        outcome = await pool.invoke(
            fn, request(fn, json.dumps({"action": "die", **event}).encode())
        )
        assert outcome.status is Status.CRASHED and (outcome.exit_code, outcome.signal) == status
    signalled = "signal: segmentation fault"
    assert (
        signalled
        in (await pool.invoke(fn, request(fn, b'{"action": "die", "signal": 11}'))).error_message
    )


def test_read_paths_and_write_paths_refuse_what_the_sandbox_hides(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    deployment(tmp_path, True)  # the layout: etc/{lambdaemon.toml, token, var, functions, ...}
    config = folder / "lambdaemon.toml"
    text = config.read_text()
    (tmp_path / "root-owned").mkdir(mode=0o755)
    daemon_package = Path(__file__).resolve().parents[2] / "daemon"
    cases = {
        ("read_paths", "var"): "would show data_dir (the database and deployed code)",
        ("read_paths", str(tmp_path)): "would show data_dir",
        ("read_paths", "."): "would show data_dir",  # the config's folder holds data_dir here
        ("read_paths", "token"): "would show a secret file the config names",
        ("read_paths", "lambdaemon.toml"): "would show the config file",
        ("read_paths", "functions"): "would show the functions folder",
        ("read_paths", "functions/other"): "would show function other's code",
        ("read_paths", "var/lambdaemon.db"): "is the daemon's own in data_dir (lambdaemon.db)",
        ("write_paths", "var/code/x"): "is the daemon's own in data_dir (code)",
        ("read_paths", "missing"): "does not exist",
        ("write_paths", str(daemon_package)): "would let the function change the daemon's",
        ("write_paths", "inbox/dropped.txt"): "is not a folder",
        ("write_paths", ""): "must be a path",
    }
    if os.getuid() == 0:
        cases["write_paths", str(tmp_path / "root-owned")] = "is not writable by uid 65534"
    for (field, value), reason in cases.items():
        setting = f"{field} = [{json.dumps(value)}]"
        config.write_text(text.replace("[functions.walls]\n", f"[functions.walls]\n{setting}\n"))
        result = run_cli("check", "--config", str(config))
        assert result.returncode == 78, (value, result.stdout)
        assert f"functions.walls.{field}[0]: " in result.stderr, result.stderr
        assert reason in result.stderr, (value, result.stderr)
    # Inside data_dir, but not the daemon's own: allowed (the example's var/out).
    (folder / "var" / "out").mkdir(mode=0o777)
    os.chmod(folder / "var" / "out", 0o777)
    setting = 'write_paths = ["var/out"]\nread_paths = ["inbox"]'
    config.write_text(text.replace("[functions.walls]\n", f"[functions.walls]\n{setting}\n"))
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr


async def test_a_daemon_that_is_not_root_sandboxes_in_a_user_namespace() -> None:
    # The tests run as root, whose sandboxes need no user namespace: this daemon runs as nobody,
    # as an ordinary user's would, and bwrap builds its sandbox in an unprivileged one.
    user = SANDBOX_UID if os.getuid() == 0 else None
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # pytest's tmp_path is root's alone
        python = _python_for_anyone(Path(folder) / "venv")
        if user is not None:
            os.chown(folder, user, user)
        shutil.copytree(WALLS, Path(folder) / "walls")
        body = '[functions.walls]\nhandler = "handler.handler"\ncode = "walls"\n'
        daemon = Daemon(write_config(Path(folder), body), user=user, python=python)
        await daemon.start()
        try:
            status, headers, answer = await daemon.invoke("walls", {"action": "self"})
            assert status == 200 and "X-Amz-Function-Error" not in headers, answer
            me = json.loads(answer)
            assert me["ppid"] == 1 and me["uid"] == (os.getuid() if user is None else user), me
            assert me["no_new_privs"] == "1" and int(me["cap_eff"], 16) == 0
            # A user namespace of its own mapping the one user, not the host's whole range
            # (0 0 4294967295); bwrap nests two, and the inner one maps it to the outer one's 0.
            assert me["uid_map"][0::2] == [str(me["uid"]), "1"], me["uid_map"]
            # On the host, the worker (bwrap, the record's worker_pid) is the daemon's user.
            record = await daemon.get(f"/v1/invocations/{headers['x-amzn-RequestId']}")
            owner = os.stat(f"/proc/{record['worker_pid']}").st_uid  # the process's euid
            assert owner == (os.getuid() if user is None else user), owner
            started = [e for e in daemon.log_events() if e.get("event") == "sandbox"]
            assert started[0]["available"] is True and started[0]["functions"] == ["walls"]
        finally:
            await daemon.close()


def _python_for_anyone(venv: Path) -> str:
    """A Python that another user can run and bwrap can mount: the one running the tests may
    live where only root can reach it (pyenv's, under /root, on this project's machine). A venv
    of the system's Python, seeing this one's packages (the daemon's dependencies; a worker needs
    the standard library and the `daemon` package only)."""
    system = shutil.which("python3", path="/usr/bin") or sys.executable
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = sysconfig.get_path("purelib")
    (
        venv
        / "lib"
        / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        / "site-packages"
        / "project.pth"
    ).write_text(site + "\n")
    return str(venv / "bin" / "python")
