"""A private Mosquitto broker for tests: a free loopback port, persistence in a tmp folder.

    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    ...                       # mqtt://127.0.0.1:{broker.port}
    broker.restart()          # same port, same persistence file: sessions and queues survive
    broker.stop()

Never the system broker on 1883: each test gets its own process and its own state.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import select
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One broker process; `stop()`/`start()` keep the port and the persistence folder."""

    def __init__(self, directory: Path, *, port: int | None = None, extra_conf: str = "") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.port_in_use = self.port  # differs while start(port=...) serves elsewhere
        self.log_path = self.directory / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def write_conf(self, port: int) -> Path:
        conf = self.directory / f"mosquitto-{port}.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            # Run as root, Mosquitto would drop to user `mosquitto`, which cannot write tmp_path.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"{self.extra_conf}\n"
        )
        return conf

    def start(self, *, port: int | None = None, timeout_s: float = 10.0) -> None:
        """Start (on `port` instead of the usual one if given); return once it listens.

        Mosquitto tells systemd READY=1 once its listeners are open; it tells us the same, on
        a socket of our own, and a pidfd says if it exits first.
        """
        assert self.proc is None or self.proc.poll() is not None, "already running"
        port = self.port_in_use = port or self.port
        stderr = self.directory / "mosquitto.stderr"
        with contextlib.ExitStack() as stack:
            notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            notify.bind(f"\0lambdaemon-test-mosquitto-{id(self)}-{port}")  # abstract
            err = stack.enter_context(stderr.open("ab"))  # the child keeps its own descriptor
            env = {**os.environ, "NOTIFY_SOCKET": "@" + notify.getsockname()[1:].decode()}
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.write_conf(port))],
                stdout=err,
                stderr=err,
                env=env,
            )
            exited = os.pidfd_open(self.proc.pid)
            stack.callback(os.close, exited)
            ready, _, _ = select.select([notify, exited], [], [], timeout_s)
            if notify in ready and notify.recv(4096).startswith(b"READY=1"):
                return
        if self.proc.poll() is not None:
            out = stderr.read_text(errors="replace")
            raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {out}")
        self.kill()
        raise TimeoutError(f"mosquitto did not listen on {port} within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Mosquitto writes its persistence file on the way out."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        self.kill()


@contextlib.contextmanager
def running_broker(directory: Path, **kwargs: object) -> Iterator[Mosquitto]:
    broker = Mosquitto(directory, **kwargs)  # type: ignore[arg-type]
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
