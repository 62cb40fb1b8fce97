"""A runtime worker's channel when the daemon serves its Runtime API on its own loop.

A `provided` or `nodejs` worker whose bootstrap can reach the daemon's loopback (no sandbox, or a
sandbox on the host's network) has no process between it and the pool: the pool listens on a
loopback port of the worker's own (`listen`), the worker is the bootstrap itself (started by
process.start_process through runtime.exec_bootstrap, AWS_LAMBDA_RUNTIME_API naming the port),
and this channel is the Runtime API (runtime.RuntimeApi) with the face of
protocol.SupervisorChannel: the pool sends it invocations and receives Ready, InitFailed and
Result from it. Each call then costs the bootstrap's two requests on the daemon's loop instead of
two more processes woken and two more hops (the bridge, runtime.Bridge).

The bootstrap's exit is its worker's exit, seen by the pool (which hangs this channel up then):
a connection that closes is only a connection, as a curl bootstrap opens one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

from daemon.pool.protocol import InitFailed, Invoke, Ready, Replies, Result
from daemon.pool.runtime import READ_BYTES, Connection, RuntimeApi


class RuntimeChannel(RuntimeApi, Replies):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, init_timeout_s: float, memory_mb: int, name: str
    ) -> None:
        RuntimeApi.__init__(self, init_timeout_s, memory_mb, name)
        Replies.__init__(self, loop)
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._memfd = -1
        self._bootstrap_pid: Callable[[], int] | None = None
        self.address = ""  # host:port, for AWS_LAMBDA_RUNTIME_API
        self.corrupt = False  # never: what the bootstrap gets wrong is answered, not fatal
        self.on_corrupt: Callable[[], object] | None = None

    async def listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            sock.setblocking(False)
            self._server = await self._loop.create_server(lambda: _Api(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()
        self.address = f"{host}:{port}"
        self._arm()  # the init deadline

    def attach(self, memfd: int, bootstrap_pid: Callable[[], int]) -> None:
        """The worker is started: its capture file, and how to find the bootstrap's process
        (below bwrap in a sandbox), looked up when it first asks for an invocation."""
        self._memfd = memfd
        self._bootstrap_pid = bootstrap_pid

    # --- the pool's side (protocol.SupervisorChannel's) ---------------------------------------

    def send(self, message: Invoke) -> None:
        if not self.closed:
            self.invoke(message)
            self._arm()

    def hang_up(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.current = self.pending = self.waiting = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.handle.close()
        self.close_memory()
        self._put(None)

    def _arm(self) -> None:
        """A timer for the next thing `tick` checks, unless one is due by then already (under
        load that is one timer per MEMORY_CHECK_S, not one per call)."""
        due = self.due()  # time.monotonic()'s
        if due is None or self.closed:
            return
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()  # the init deadline's, once init is over
        self._timer_due = due
        self._timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        self.tick()
        self._arm()

    # --- RuntimeApi's hooks -------------------------------------------------------------------

    def send_bytes(self, conn: Connection, data: bytes) -> None:
        transport = conn.handle
        if transport.is_closing():
            conn.closing = True
        else:
            transport.write(data)

    def close(self, conn: Connection) -> None:
        self.closed_connection(conn)
        conn.handle.close()

    def to_pool(self, message: Ready | InitFailed | Result) -> None:
        if isinstance(message, Ready) and self._bootstrap_pid is not None:
            self.watch_memory(self._bootstrap_pid())
            self._arm()
        self._put(message)

    def quiet(self) -> bool:
        try:
            return self._memfd >= 0 and os.fstat(self._memfd).st_size == 0
        except OSError:
            return False

    def log(self, line: str) -> None:
        if self._memfd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._memfd, line.encode())

    def out_of_memory(self) -> None:
        pass  # the pool kills it on the result that follows, which retires it, at once

    def finished(self) -> None:
        pass  # the pool kills it on InitFailed

    # --- connections --------------------------------------------------------------------------

    def _connected(self, conn: Connection) -> None:
        if self.closed:
            conn.handle.close()
        else:
            self._connections.add(conn)

    def _received(self, conn: Connection, data: bytes) -> None:
        if not self.closed:
            self.received(conn, data)
            self._arm()

    def _lost(self, conn: Connection) -> None:
        self._connections.discard(conn)
        self.closed_connection(conn)


class _Api(asyncio.BufferedProtocol):
    """One connection of the bootstrap. Read into a buffer of its own (BufferedProtocol): the
    plain Protocol's 256 KiB reads cost an mmap and a munmap each."""

    def __init__(self, channel: RuntimeChannel) -> None:
        self.channel = channel
        self.buffer = bytearray(READ_BYTES)
        self.view = memoryview(self.buffer)
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = Connection(transport)
        self.channel._connected(self.conn)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert self.conn is not None
        self.channel._received(self.conn, bytes(self.view[:nbytes]))

    def eof_received(self) -> bool:
        return False  # closes the connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.channel._lost(self.conn)
