"""Functions' logs as CloudWatch shows them, past and followed live (`lambdaemon logs -f`).

An invocation's lines are Lambda's: `START RequestId: ... Version: ...`, what the handler printed,
`END RequestId: ...` and the `REPORT` line with its durations and memory. Past lines come from the
store (each record's last attempt); followed lines are handed over by the dispatcher as each
attempt ends, to every follower whose filter takes them.

A follower never slows the daemon down: each has a queue of at most `FOLLOWER_LINES` lines, and
lines that find it full are dropped and counted; the follower is then told how many it missed.
With nobody following, an attempt's end costs one set lookup.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from daemon.models import Outcome, Status

FOLLOWER_LINES = 2000  # per follower, waiting for a slow client; past it, lines are counted


class LogLine(msgspec.Struct, frozen=True, omit_defaults=True):
    """One line of a function's log, as /v1/logs sends it (one JSON object per line)."""

    time: float  # epoch seconds: the attempt's start for START and output, its end for the rest
    function: str
    invocation_id: str
    version: str
    attempt: int
    status: str  # the attempt's outcome
    line: str
    missed: int = 0  # on a notice only: lines dropped since the last one this follower got


def report_line(
    invocation_id: str,
    memory_mb: int,
    duration_ms: float,
    billed_ms: int,
    max_memory_mb: float | None,
    init_duration_ms: float | None,
    status: str,
    error_type: str | None,
) -> str:
    """Lambda's REPORT line for one attempt."""
    report = (
        f"REPORT RequestId: {invocation_id}\tDuration: {duration_ms:.2f} ms\t"
        f"Billed Duration: {billed_ms} ms\tMemory Size: {memory_mb} MB\t"
        f"Max Memory Used: {round(max_memory_mb or 0)} MB\t"
    )
    if init_duration_ms is not None:
        report += f"Init Duration: {init_duration_ms:.2f} ms\t"
    if status == Status.TIMED_OUT.value:
        report += "Status: timeout"
    elif status == Status.CRASHED.value:
        report += f"Status: error\tError Type: {error_type}"
    return report


def invocation_text(invocation_id: str, version: str, memory_mb: int, outcome: Outcome) -> str:
    """An attempt's whole log: START, the handler's output, END and REPORT."""
    logs = outcome.logs
    report = report_line(
        invocation_id,
        memory_mb,
        outcome.duration_ms,
        outcome.billed_duration_ms,
        outcome.max_memory_mb,
        outcome.init_duration_ms,
        outcome.status.value,
        outcome.error_type,
    )
    return (
        f"START RequestId: {invocation_id} Version: {version}\n{logs}"
        f"{'' if not logs or logs.endswith(chr(10)) else chr(10)}"
        f"END RequestId: {invocation_id}\n{report}\n"
    )


def record_lines(record: dict[str, Any], memory_mb: int) -> list[LogLine]:
    """The lines of a stored record's last attempt (a row of Store.log_records)."""
    if record["started_at"] is None:  # never ran (queued, or rejected before running)
        return []
    invocation_id, status = record["id"], record["status"]
    logs = record["logs"] or ""
    report = report_line(
        invocation_id,
        memory_mb,
        record["duration_ms"] or 0.0,
        record["billed_duration_ms"] or 0,
        record["max_memory_mb"],
        record["init_duration_ms"],
        status,
        record["error_type"],
    )
    start, end = record["started_at"], record["ended_at"] or record["started_at"]
    timed = [(start, f"START RequestId: {invocation_id} Version: {record['function_version']}")]
    timed += [(start, text) for text in logs.splitlines()]
    if status != Status.RUNNING.value:
        timed += [(end, f"END RequestId: {invocation_id}"), (end, report)]
    return [
        LogLine(
            at,
            record["function"],
            invocation_id,
            record["function_version"],
            record["attempt"],
            status,
            text,
        )
        for at, text in timed
    ]


class Follower:
    """One client following the logs of a function (or all, `function` None)."""

    def __init__(self, hub: LogHub, function: str | None, status: str | None) -> None:
        self._hub = hub
        self.function, self.status = function, status
        self._lines: deque[LogLine] = deque()
        self._missed = 0
        self._wake = asyncio.Event()
        self._closed = False

    def wants(self, function: str, status: str) -> bool:
        return self.function in (None, function) and self.status in (None, status)

    def offer(self, lines: list[LogLine]) -> None:
        room = FOLLOWER_LINES - len(self._lines)
        if room < len(lines):
            self._missed += len(lines) - max(room, 0)
            lines = lines[: max(room, 0)]
        self._lines.extend(lines)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._hub.unfollow(self)

    async def lines(self) -> AsyncIterator[LogLine]:
        """The lines as they come, with a notice (`missed`) after any that were dropped; ends
        when the hub closes."""
        try:
            while not self._closed:
                await self._wake.wait()
                self._wake.clear()
                while self._lines:
                    if self._missed:
                        first = self._lines[0]
                        yield msgspec.structs.replace(
                            first,
                            line=f"[lambdaemon] {self._missed} lines missed",
                            missed=self._missed,
                        )
                        self._missed = 0
                    yield self._lines.popleft()
                if self._missed:  # dropped, and nothing kept since
                    missed, self._missed = self._missed, 0
                    notice = f"[lambdaemon] {missed} lines missed"
                    yield LogLine(0.0, self.function or "", "", "", 0, "", notice, missed=missed)
        finally:
            self.close()


class LogHub:
    """Hands each attempt's lines to the followers that want them."""

    def __init__(self) -> None:
        self.followers: set[Follower] = set()

    def follow(self, function: str | None, status: str | None) -> Follower:
        follower = Follower(self, function, status)
        self.followers.add(follower)
        return follower

    def unfollow(self, follower: Follower) -> None:
        self.followers.discard(follower)

    def publish(
        self,
        function: str,
        invocation_id: str,
        version: str,
        memory_mb: int,
        attempt: int,
        outcome: Outcome,
    ) -> None:
        """An attempt ended: its lines go to whoever follows (call only when someone does)."""
        status = outcome.status.value
        takers = [f for f in self.followers if f.wants(function, status)]
        if not takers:
            return
        text = invocation_text(invocation_id, version, memory_mb, outcome)
        lines = [
            LogLine(
                outcome.ended_at if line.startswith(("END ", "REPORT ")) else outcome.started_at,
                function,
                invocation_id,
                version,
                attempt,
                status,
                line,
            )
            for line in text.splitlines()
        ]
        for follower in takers:
            follower.offer(lines)

    def close(self) -> None:
        for follower in list(self.followers):
            follower.close()
