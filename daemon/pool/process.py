"""One worker process, seen from the daemon: its start, files, output, exit and end of life.

The pool (supervisor.py) decides which worker serves which call and keeps the slot accounting;
this module knows a single process: how it is started (clean environment, own process group,
capture memfd, control socket), what it printed, and when it
has served long enough to be recycled. It also carries the child watcher the pool reaps with.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from daemon.config import FunctionConfig, node_binary
from daemon.pool.descendants import children, kill_tree
from daemon.pool.outcomes import kb_to_mb
from daemon.pool.protocol import DEPS_ENV, Invoke, SupervisorChannel
from daemon.pool.runtime_channel import RuntimeChannel
from daemon.pool.sandbox import wrap

log = structlog.get_logger("lambdaemon.pool")

_GUARD_INTERVAL_S = 0.1  # how often a running invocation's captured output is checked for size
_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the `daemon` package
_replaced_watchers: list[object] = []

Key = tuple[Any, ...]
Instance = tuple[str, str]  # (function name, version): the workers of one code version
TIMED_OUT = object()  # the reply placeholder set by the deadline timer


class State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"  # killed or exiting; still holds its slot until reaped
    EXITED = "exited"


class Worker:
    """One worker process of one function configuration (`key`), and the files it shares."""

    __slots__ = (
        "fn",
        "key",
        "proc",
        "pid",
        "memfd",
        "channel",
        "state",
        "stop_reason",
        "stop_detail",
        "idle_since",
        "init_duration_ms",
        "exit_task",
        "held",
        "deadline",
        "timer",
        "guarding",
        "peak_kb",
        "invocations",
        "recycle",
        "mark",
        "instance",
    )

    def __init__(
        self,
        fn: FunctionConfig,
        key: Key,
        proc: asyncio.subprocess.Process,
        memfd: int,
        loop: asyncio.AbstractEventLoop,
        mark: str,
        runtime_api: RuntimeChannel | None = None,
    ) -> None:
        self.fn = fn
        self.instance: Instance = (fn.name, fn.version)
        self.mark = mark  # in its environment and its descendants' (descendants.py)
        self.key = key
        self.proc = proc
        self.pid = proc.pid
        self.memfd = memfd
        # Frames on the control socket, or the Runtime API the daemon serves the bootstrap.
        self.channel: SupervisorChannel | RuntimeChannel
        if runtime_api is None:
            self.channel = SupervisorChannel(loop)
        else:
            self.channel = runtime_api
            runtime_api.attach(memfd, self.main_pid)
        self.state = State.STARTING
        self.stop_reason: str | None = None
        self.stop_detail: dict[str, Any] = {}  # logged with worker_stopped (why it was recycled)
        self.idle_since = 0.0
        self.init_duration_ms: float | None = None
        self.exit_task: asyncio.Task[None] | None = None
        self.held = True  # a caller still reads its captured output: it closes the files
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None  # the guard, while one is due
        # What the guard watches: the call in flight (its reply, capture cap, deadline hook).
        self.guarding: tuple[asyncio.Future[Any], int, Callable[[Worker], None]] | None = None
        self.peak_kb: int | None = None
        self.invocations = 0  # invocations sent to this process
        self.recycle: dict[str, Any] | None = None  # set when it must not serve another call

    def close_files(self) -> None:
        self.channel.hang_up()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1

    def kill_tree(self) -> None:
        """SIGKILL the worker, its process group and its descendants, whatever session they
        moved to: whatever its handler left running (descendants.py)."""
        kill_tree(self.pid)

    def main_pid(self) -> int:
        """The pid of the worker's own program: in a sandbox, below bwrap and its init."""
        if not self.fn.sandbox:
            return self.pid
        pid = self.pid
        for _ in range(2):
            below = children(pid)
            if not below:
                return pid
            pid = below[0]
        return pid

    def kill_group(self) -> None:
        """SIGKILL what is left of the process group of a worker that has exited and been
        reaped (its pid may already be another process's; its children moved to the daemon,
        whose sweep finds them)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def wait_exit(self, timeout_s: float) -> bool:
        assert self.exit_task is not None
        done, _ = await asyncio.wait([self.exit_task], timeout=timeout_s)
        return bool(done)

    def check_recycle(self, fn: FunctionConfig, rss_kb: int | None) -> None:
        """After a reply: mark the worker for recycling when it served its quota or grew too big.

        Checked between invocations only, so a running call is never cut short; `fn` holds the
        latest settings (these keys are not part of the worker's key: changing them retires
        nobody, the new limits apply from the next release on).
        """
        if fn.max_invocations_per_worker and self.invocations >= fn.max_invocations_per_worker:
            self.recycle = {
                "why": "max_invocations",
                "invocations": self.invocations,
                "max_invocations_per_worker": fn.max_invocations_per_worker,
            }
        elif fn.max_worker_rss_mb and rss_kb is not None and rss_kb >= fn.max_worker_rss_mb * 1024:
            self.recycle = {
                "why": "rss",
                "rss_mb": kb_to_mb(rss_kb),
                "max_worker_rss_mb": fn.max_worker_rss_mb,
                "invocations": self.invocations,
            }

    async def call(
        self,
        loop: asyncio.AbstractEventLoop,
        invoke: Invoke,
        timeout_s: float,
        capture_bytes: int,
        on_deadline: Callable[[Worker], None],
    ) -> Any:
        """Send one invocation; the reply, None when the worker died, TIMED_OUT at the deadline.

        `on_deadline(worker)` runs from the deadline timer, before the call returns.
        """
        reply = self.channel.receive()
        self.channel.send(invoke)
        self.invocations += 1
        self.deadline = loop.time() + timeout_s
        self.guarding = (reply, capture_bytes, on_deadline)
        # The last call's guard, still due within _GUARD_INTERVAL_S, serves this call too: a
        # warm worker under load arms a timer every 0.1 s, not one per call.
        timer = self.timer
        if timer is None or timer.when() > self.deadline:
            if timer is not None:
                timer.cancel()
            self._arm_guard(loop)
        try:
            return await reply
        finally:
            self.guarding = None

    def _arm_guard(self, loop: asyncio.AbstractEventLoop) -> None:
        when = min(self.deadline, loop.time() + _GUARD_INTERVAL_S)
        self.timer = loop.call_at(when, self._guard, loop)

    def _guard(self, loop: asyncio.AbstractEventLoop) -> None:
        """Timer during a call: enforces the deadline, and bounds the captured output's size."""
        self.timer = None
        if self.guarding is None:
            return  # between calls: the next one arms a guard of its own
        reply, capture_bytes, on_deadline = self.guarding
        if reply.done():
            return
        if loop.time() >= self.deadline - 0.001:
            on_deadline(self)
            reply.set_result(TIMED_OUT)
            return
        # Only the first bytes are kept, so the rest is dropped while the handler runs: a handler
        # printing in a loop must not fill the daemon's memory (a memfd is RAM).
        if os.fstat(self.memfd).st_size > capture_bytes + 1:
            os.ftruncate(self.memfd, capture_bytes + 1)
        self._arm_guard(loop)

    def read_output(self, invocation_id: str | None, capture_bytes: int) -> str:
        """The captured output, capped, and also logged line by line; the file is emptied.

        Emptied right away, so what is in it when the next call starts belongs to that call:
        a cold worker's init output, or what a thread of the handler wrote after the reply.
        """
        data = os.pread(self.memfd, capture_bytes + 1, 0)
        if not data:
            return ""
        os.ftruncate(self.memfd, 0)
        text = data[:capture_bytes].decode("utf-8", "replace")
        bound = log.bind(invocation_id=invocation_id, function=self.fn.name)
        for line in text.split("\n"):
            if line:
                bound.info("handler_output", line=line)
        if len(data) > capture_bytes:
            text += f"\n[lambdaemon: output truncated to the first {capture_bytes} bytes]\n"
        return text


def new_log_stream(fn: FunctionConfig) -> str:
    """AWS_LAMBDA_LOG_STREAM_NAME for a new worker: Lambda's form, unique per worker (its
    descendants inherit it, and the pool tells whose orphan a process is by it)."""
    return f"{time.strftime('%Y/%m/%d', time.gmtime())}/[{fn.version}]{os.urandom(16).hex()}"


async def start_process(
    fn: FunctionConfig,
    child_sock: socket.socket,
    memfd: int,
    on_demand: bool,
    stream: str,
    platform: Mapping[str, str] | None = None,
    runtime_api: str | None = None,
) -> asyncio.subprocess.Process:
    """Exec the worker for `fn`: own session, clean env, output on `memfd`.

    Every kind of worker starts here: `python -m daemon.pool.worker` for a Python function, and
    for the others their `bootstrap`: on the Runtime API the daemon serves at `runtime_api`
    (runtime_channel.py), or behind a bridge of its own (runtime.py) when it is None.
    """
    assert fn.code is not None
    fd, daemon_pid = str(child_sock.fileno()), str(os.getpid())
    initialization = "on-demand" if on_demand else "provisioned-concurrency"
    env = environment(fn, initialization, stream, platform)
    if fn.sandbox:
        daemon_pid = "1"  # its parent: the sandbox's init, which dies with the daemon
    if fn.runtime == "python":
        argv = [sys.executable, "-m", "daemon.pool.worker", fd, daemon_pid]
    elif runtime_api is not None:
        env["AWS_LAMBDA_RUNTIME_API"] = runtime_api
        argv = [sys.executable, "-m", "daemon.pool.runtime", "--exec", fd, daemon_pid]
        argv += bootstrap_argv(fn, env)
    else:
        argv = [sys.executable, "-m", "daemon.pool.runtime", fd, daemon_pid, f"{fn.timeout_s}"]
        argv += bootstrap_argv(fn, env)
    if fn.sandbox:  # the same command, in bubblewrap (sandbox.py), which keeps the fds passed
        argv = wrap(fn, argv)
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=memfd,
        stderr=memfd,
        pass_fds=(child_sock.fileno(),),
        start_new_session=True,
        cwd="/" if fn.sandbox else fn.code,
        env=env,
    )


NODE_BOOTSTRAP = str(Path(__file__).resolve().parent / "node" / "bootstrap.mjs")


def serves_runtime_api(fn: FunctionConfig) -> bool:
    """Whether the daemon serves `fn`'s Runtime API itself (runtime_channel.py): a runtime
    worker that can reach the daemon's loopback. In a sandbox with `network = false` the
    loopback is the sandbox's own, and a bridge inside it serves the API (runtime.py)."""
    return fn.runtime != "python" and (not fn.sandbox or fn.network)


def bootstrap_path(fn: FunctionConfig) -> str:
    """The program a runtime worker runs: the function's `bootstrap`, or lambdaemon's Node.js
    one (which messages name, rather than `node`)."""
    assert fn.code is not None
    return os.path.join(fn.code, "bootstrap") if fn.runtime == "provided" else NODE_BOOTSTRAP


def bootstrap_argv(fn: FunctionConfig, env: dict[str, str]) -> list[str]:
    """The command a runtime worker starts (as Lambda's provided.al2023 and nodejs runtimes
    do), and its changes to the environment: AWS_EXECUTION_ENV and LAMBDA_RUNTIME_DIR."""
    assert fn.code is not None
    if fn.runtime == "provided":
        del env["AWS_EXECUTION_ENV"]  # Lambda sets none for OS-only runtimes
        return [bootstrap_path(fn)]
    node = node_binary() or "node"
    env["AWS_EXECUTION_ENV"] = f"AWS_Lambda_nodejs{node_major(node)}.x"
    env["LAMBDA_RUNTIME_DIR"] = os.path.dirname(NODE_BOOTSTRAP)
    # V8's heap within the function's memory, as Lambda's Node.js runtimes set it.
    heap_mb = max(16, fn.memory_mb * 85 // 100)
    return [node, f"--max-old-space-size={heap_mb}", NODE_BOOTSTRAP]


_node_majors: dict[str, str] = {}


def node_major(node: str) -> str:
    """The major version of the Node.js binary `node` ("20"), asked once per binary."""
    if node not in _node_majors:
        import subprocess

        try:
            out = subprocess.run(
                [node, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
            _node_majors[node] = out.strip().lstrip("v").split(".")[0] or "0"
        except OSError:
            _node_majors[node] = "0"
    return _node_majors[node]


def capture_file(name: str) -> int:
    """The memfd a worker's fd 1 and 2 write to."""
    memfd = os.memfd_create(f"lambdaemon-{name}", os.MFD_CLOEXEC)
    # O_APPEND: the child's writes land at the end even after the parent truncates the file.
    fcntl.fcntl(memfd, fcntl.F_SETFL, fcntl.fcntl(memfd, fcntl.F_GETFL) | os.O_APPEND)
    return memfd


def environment(
    fn: FunctionConfig,
    initialization: str,
    stream: str,
    platform: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A clean environment: PATH, LANG, what the platform offers every function (`platform`:
    where the AWS SDK finds Lambda, and credentials for it), the function's env, which may
    override those, then Lambda's reserved variables."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": os.environ.get("LANG", "C.UTF-8")}
    env.update(platform or {})
    env.update(fn.env)
    env.update(
        {
            "_HANDLER": fn.handler,
            "LAMBDA_TASK_ROOT": str(fn.code),
            "LAMBDA_RUNTIME_DIR": _ROOT,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_python{sys.version_info[0]}.{sys.version_info[1]}",
            "AWS_LAMBDA_FUNCTION_NAME": fn.name,
            "AWS_LAMBDA_FUNCTION_VERSION": fn.version,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(fn.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": fn.log_group,
            "AWS_LAMBDA_LOG_STREAM_NAME": stream,
            "AWS_LAMBDA_INITIALIZATION_TYPE": initialization,
            "AWS_REGION": fn.region,
            "AWS_DEFAULT_REGION": fn.region,
            "TZ": "UTC",
        }
    )
    # The worker must import `daemon` from this very tree, installed or not; it removes this
    # entry again before importing the handler.
    user_path = fn.env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{_ROOT}{os.pathsep}{user_path}" if user_path else _ROOT
    # The dependency folder goes by a variable of its own, which the worker takes out of its
    # environment, rather than on PYTHONPATH: a handler's subprocesses (another interpreter, a
    # tool written in Python) would import packages installed for this interpreter from it.
    env.pop(DEPS_ENV, None)
    if fn.deps:
        env[DEPS_ENV] = fn.deps
    env.pop("NOTIFY_SOCKET", None)  # only the daemon talks to systemd
    return env


# --- reaping -------------------------------------------------------------------------------------


def use_pidfd_child_watcher() -> None:
    """On 3.11, reap children through pidfds instead of one blocking waitpid() thread per child."""
    if sys.version_info >= (3, 12):  # pidfds are already the default there
        return
    watcher = asyncio.get_child_watcher()
    if isinstance(watcher, _PidfdChildWatcher):
        return
    try:  # pidfds need Linux 5.3; older kernels keep the threaded watcher
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return
    # Kept referenced: if it still waits for someone else's child, dropping it would warn.
    _replaced_watchers.append(watcher)
    asyncio.set_child_watcher(_PidfdChildWatcher())


# Child watchers are deprecated from 3.12 (gone in 3.14), where this class is never used.
if sys.version_info >= (3, 12):
    _ChildWatcher = object
else:
    _ChildWatcher = asyncio.AbstractChildWatcher


class _PidfdChildWatcher(_ChildWatcher):
    """3.12's pidfd watcher for 3.11, whose own one is bound to a single event loop.

    This one serves whichever loop is running, so it is safe as the process-wide watcher.
    """

    def add_child_handler(  # type: ignore[override]
        self, pid: int, callback: Callable[..., object], *args: Any
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # EMFILE: the child runs, but nothing could ever tell of its exit
            self._kill_and_reap(loop, pid, callback, args)
            return
        loop.add_reader(pidfd, self._reap, loop, pid, pidfd, callback, args)

    @staticmethod
    def _kill_and_reap(
        loop: asyncio.AbstractEventLoop,
        pid: int,
        callback: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        """End a child that cannot be watched at once: to its caller it died starting (the pool
        reads that as a crash in init), rather than living on unreaped with its slot."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        try:
            _, status = os.waitpid(pid, 0)  # brief: SIGKILL is not blocked by anything
        except ChildProcessError:
            returncode = 255
        else:
            returncode = os.waitstatus_to_exitcode(status)
        loop.call_soon(callback, pid, returncode, *args)

    @staticmethod
    def _reap(
        loop: asyncio.AbstractEventLoop,
        pid: int,
        pidfd: int,
        callback: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped elsewhere; the exit status is lost
            returncode = 255
        else:
            returncode = os.waitstatus_to_exitcode(status)
        callback(pid, returncode, *args)

    def remove_child_handler(self, pid: int) -> bool:
        return False

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __enter__(self) -> _PidfdChildWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass
