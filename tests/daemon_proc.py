"""The real daemon as a subprocess, for end-to-end, crash and signal tests.

async with running_daemon(tmp_path, functions_toml) as d:
    status, body = await d.invoke("hello", {"name": "x"})
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import io
import json
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.waits import until, until_changed

ROOT = Path(__file__).resolve().parent.parent


class Gate:
    """A file this process holds locked until the test opens the gate.

    A handler that must wait for the test takes a shared flock() on the file: it blocks in the
    kernel until release() drops the lock, with no polling, and passes at once from then on
    (also after a restart). Its function's timeout_s bounds the wait.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the lock
            self._fd = -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(
    tmp_path: Path,
    body: str,
    *,
    api_port: int | None = None,
    daemon: str = "",
    shutdown_timeout_s: float = 5,
    shared: bool = True,
) -> Path:
    """A config in tmp_path: data in tmp_path/var, API on a free port, then `body` (TOML), in
    which every function may write shared_folder(tmp_path) (write_paths) unless not `shared`."""
    api_port = api_port or free_port()
    path = tmp_path / "lambdaemon.toml"
    if shared:
        shared_folder(tmp_path)
        body = FUNCTION_TABLE.sub(lambda table: f'{table[0]}\nwrite_paths = ["{SHARED}"]', body)
    path.write_text(
        f'[daemon]\ndata_dir = "var"\nfunctions_dir = "{ROOT / "functions"}"\n'
        f"shutdown_timeout_s = {shutdown_timeout_s}\n{daemon}\n"
        f'[api]\nlisten = "127.0.0.1:{api_port}"\n\n{body}\n'
    )
    return path


# A test's folder is its daemon's config folder, which a sandboxed worker does not see: what a
# handler and its test both use (gates, markers, the files a handler logs to) goes in
# tmp_path/shared, which write_config shows every function (write_paths), writable by anyone:
# a root daemon's sandboxed workers are nobody.
SHARED = "shared"
FUNCTION_TABLE = re.compile(r"^\[functions\.[A-Za-z0-9_-]+\][^\n]*$", re.MULTILINE)


def shared_folder(tmp_path: Path) -> Path:
    """tmp_path/shared (see SHARED), created."""
    folder = tmp_path / SHARED
    folder.mkdir(exist_ok=True)
    folder.chmod(0o1777)
    return folder


class Daemon:
    """A `lambdaemon run` subprocess and an HTTP client for its admin API."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str] | None = None,
        *,
        nofile: int | None = None,
        drop_caps: tuple[int, ...] = (),
        user: int | None = None,
        python: str = sys.executable,
    ) -> None:
        self.config = config
        self.env = env or {}  # added to the daemon's environment (NOTIFY_SOCKET, ...)
        self.nofile = nofile  # RLIMIT_NOFILE, soft and hard, for the daemon (None: inherited)
        # Capabilities the daemon runs without (e.g. CAP_DAC_OVERRIDE: root is then refused a
        # file its mode refuses, as any other user is).
        self.drop_caps = drop_caps
        self.user = user  # run as this uid (and gid of the same number), without groups: setpriv
        self.python = python
        text = config.read_text()
        self.api_port = int(text.split('listen = "127.0.0.1:', 1)[1].split('"', 1)[0])
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = config.parent / "daemon.log"
        self.session: aiohttp.ClientSession | None = None
        # start() hears READY=1 as systemd would: on a datagram socket of our own.
        self._notify: socket.socket | None = None
        self._ready = asyncio.Event()
        # The log parsed so far: log_path is read from _log_read on, up to its last full line.
        self._events: list[dict[str, Any]] = []
        self._log_read = 0
        self._log_tail = b""

    async def spawn(self) -> None:
        """Start the process; return at once (start() also waits until it is healthy)."""
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"} | self.env
        if self._notify is not None and "NOTIFY_SOCKET" not in self.env:
            env["NOTIFY_SOCKET"] = "@" + self._notify.getsockname()[1:].decode()
        log = self.log_path.open("ab")
        nofile, drop_caps = self.nofile, self.drop_caps
        prctl = _libc().prctl  # looked up here: the child only calls it

        def limit() -> None:  # in the child, before exec
            if nofile is not None:  # both: the daemon raises its soft limit to the hard one
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            for cap in drop_caps:  # out of the bounding set: root execs without it
                if prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    os._exit(126)

        as_user = []
        if self.user is not None:
            as_user = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--clear-groups"]
        self.proc = await asyncio.create_subprocess_exec(
            *as_user,
            self.python,
            "-m",
            "daemon.cli",
            "run",
            "--config",
            str(self.config),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
            preexec_fn=limit if nofile is not None or drop_caps else None,
        )
        log.close()
        self.session = self.session or aiohttp.ClientSession()

    async def start(self, timeout_s: float = 20) -> None:
        """Spawn the daemon and return once it has told "systemd" READY=1 and /health says ok;
        RuntimeError with its log if it exits first."""
        own_notify = "NOTIFY_SOCKET" not in self.env  # a test listening itself gets the messages
        if own_notify and self._notify is None:
            self._listen_for_ready()
        self._ready.clear()
        mark = self.log_mark()
        await self.spawn()
        assert self.proc is not None and self.session is not None
        async with asyncio.timeout(timeout_s):
            if own_notify:
                ready = asyncio.ensure_future(self._ready.wait())
                exited = asyncio.ensure_future(self.proc.wait())
                await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                exited.cancel()
            if self.proc.returncode is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            # Logged once /health says ok, and before READY=1 is sent.
            await self.wait_log("daemon_ready", since=mark, timeout_s=timeout_s)
            if not await self._healthy():
                raise RuntimeError(f"daemon_ready logged, but /health is not ok:\n{self.logs()}")

    async def _healthy(self) -> bool:
        assert self.session is not None
        with contextlib.suppress(aiohttp.ClientError):
            async with self.session.get(f"{self.base}/health") as resp:
                return resp.status == 200
        return False

    def _listen_for_ready(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(f"\0lambdaemon-test-{os.getpid()}-{id(self)}")  # abstract: nothing to clean up
        sock.setblocking(False)
        self._notify = sock

        def receive() -> None:
            with contextlib.suppress(BlockingIOError):
                while True:
                    if sock.recv(4096).startswith(b"READY=1"):
                        self._ready.set()

        asyncio.get_running_loop().add_reader(sock.fileno(), receive)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, parsed (the `<N>` journald prefix removed)."""
        self._read_log()
        return list(self._events)

    def log_mark(self) -> int:
        """A position in the log, for `wait_log(..., since=...)`."""
        self._read_log()
        return len(self._events)

    async def wait_log(
        self, event: str, count: int = 1, *, since: int = 0, timeout_s: float = 20, **keys: Any
    ) -> list[dict[str, Any]]:
        """The log lines of `event` with these keys, once there are `count` of them after
        position `since` (0: the whole log, earlier runs included), logged already or not.

        Woken by the daemon's writes to its log (inotify), bounded by `timeout_s`.
        """
        found: list[dict[str, Any]] = []
        at = since

        def enough() -> list[dict[str, Any]] | None:
            nonlocal at
            self._read_log()
            found.extend(e for e in self._events[at:] if _matches(e, event, keys))
            at = len(self._events)
            return found if len(found) >= count else None

        what = f"{count} x {event} {keys or ''} in the daemon's log"
        return await until_changed(self.log_path, enough, timeout_s, what)  # type: ignore[no-any-return]

    async def wait_logged(
        self, check: Callable[[], Any], timeout_s: float = 20, what: str = ""
    ) -> Any:
        """`check()`'s first truthy value, tried now and each time the daemon writes its log:
        for a condition on its log lines, or on state it changes before logging a line."""
        return await until_changed(self.log_path, check, timeout_s, what or "a logged condition")

    async def wait_stored(
        self, check: Callable[[], Any], timeout_s: float = 20, what: str = ""
    ) -> Any:
        """`check()`'s first truthy value, tried now and after each write to the daemon's log,
        each time once the store has committed the writes the daemon had enqueued by then: for
        the database as an invocation's lines describe it (see finished())."""

        async def committed() -> Any:
            await self.barrier()
            return check()

        return await self.wait_logged(committed, timeout_s, what or "a stored condition")

    async def barrier(self) -> None:
        """Return once the daemon's store has committed every write enqueued before this call
        (the admin API reads after a store barrier)."""
        await self.get("/v1/invocations?limit=1")

    async def finished(self, invocation_id: str, timeout_s: float = 20, **keys: Any) -> Any:
        """The record of `invocation_id` once an attempt of it has logged invocation_finished
        (with these keys, e.g. status="succeeded") and the record shows that outcome.

        The line is logged just before the outcome is written, but that write is enqueued
        before the daemon serves another request, and the admin API reads after a store
        barrier: the first read after the line normally has it.
        """
        wanted = keys.get("status")

        async def recorded() -> Any:
            record = await self.get(f"/v1/invocations/{invocation_id}")
            status = record.get("status")
            done = status == wanted if wanted else status not in (None, "queued", "running")
            return record if done else None

        async with asyncio.timeout(timeout_s):  # one bound for both
            await self.wait_log(
                "invocation_finished", invocation_id=invocation_id, timeout_s=timeout_s, **keys
            )
            return await self.wait_logged(recorded, timeout_s, f"the outcome of {invocation_id}")

    def _read_log(self) -> None:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_read)
                data = log.read()
        except FileNotFoundError:
            return
        self._log_read += len(data)
        *lines, self._log_tail = (self._log_tail + data).split(b"\n")
        for line in lines:
            if line.startswith(b"<") and b">{" in line[:4]:
                with contextlib.suppress(ValueError):
                    self._events.append(json.loads(line[line.index(b">") + 1 :]))

    async def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()

    async def kill(self) -> None:
        """SIGKILL, as a power cut would (workers die with the daemon: parent-death signal)."""
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def stop(self) -> int:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return await self.wait(30)
            except TimeoutError:
                await self.kill()
        return self.proc.returncode if self.proc else 0

    async def close(self) -> None:
        await self.stop()
        if self.session:
            await self.session.close()
            self.session = None
        if self._notify is not None:
            asyncio.get_running_loop().remove_reader(self._notify.fileno())
            self._notify.close()
            self._notify = None

    # --- API helpers ---------------------------------------------------------------------

    async def invoke(
        self,
        name: str,
        event: Any = None,
        *,
        kind: str = "RequestResponse",
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ):
        """POST the Invoke API; returns (status, headers, body bytes)."""
        assert self.session is not None
        body = raw if raw is not None else json.dumps(event if event is not None else {}).encode()
        hdrs = {"X-Amz-Invocation-Type": kind, **(headers or {})}
        url = f"{self.base}/2015-03-31/functions/{name}/invocations"
        data = io.BytesIO(body) if len(body) > 512 * 1024 else body  # aiohttp warns on big bytes
        async with self.session.post(url, data=data, headers=hdrs) as resp:
            return resp.status, resp.headers, await resp.read()

    async def get(self, path: str) -> Any:
        assert self.session is not None
        async with self.session.get(f"{self.base}{path}") as resp:
            return await resp.json()

    async def invocations(self, **query: str) -> list[dict[str, Any]]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return (await self.get(f"/v1/invocations?limit=1000&{qs}"))["invocations"]

    async def wait_for(self, predicate, timeout_s: float = 20, interval_s: float = 0.01):
        """`until(predicate)`: polling, for state of this daemon that nothing announces."""
        what = getattr(predicate, "__name__", "a condition")
        return await until(predicate, timeout_s, what, interval_s)


PR_CAPBSET_DROP = 24  # prctl(2)
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2  # capabilities(7)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _matches(entry: dict[str, Any], event: str, keys: dict[str, Any]) -> bool:
    return entry.get("event") == event and all(entry.get(k) == v for k, v in keys.items())


@contextlib.asynccontextmanager
async def running_daemon(tmp_path: Path, body: str, **kwargs: Any) -> AsyncIterator[Daemon]:
    daemon = Daemon(write_config(tmp_path, body, **kwargs))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.close()
