"""sd_notify over $NOTIFY_SOCKET, in a few lines of our own (errors are reported, not swallowed)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import structlog

from daemon import logs

log = structlog.get_logger("lambdaemon.systemd")


def notify(message: str) -> bool:
    """Send one datagram (`READY=1`, `STOPPING=1`, ...); False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    logs.flush()  # what the daemon logged before (daemon_ready, ...) reaches journald first
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:
        log.warning("sd_notify_failed", message=message.split("\n", 1)[0], error=str(exc))
        return False


def reloading_message(status: str = "reloading") -> str:
    """`RELOADING=1` with the MONOTONIC_USEC= that Type=notify-reload requires (harmless before)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status}"


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec=, when systemd asked this process for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def run_watchdog(interval_s: float) -> None:
    """Ping from the event loop itself, so a stuck loop stops the pings and systemd restarts us."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)
