"""How a call ended, as an Outcome: a result, Lambda's timeout and exit errors, and its metering.

The supervisor builds every Outcome of a call through these, so a timeout or a crash reads the
same wherever the pool notices it.
"""

from __future__ import annotations

import signal
import time

import msgspec

from daemon.models import Outcome, Status

_JSON = msgspec.json.Encoder()


def call_outcome(
    status: Status,
    payload: bytes,
    started_at: float,
    clock: float,
    error_type: str | None,
    error_message: str | None,
) -> Outcome:
    duration_ms = (time.perf_counter() - clock) * 1000
    return Outcome(
        status,
        payload,
        started_at,
        started_at + duration_ms / 1000,
        duration_ms,
        error_type,
        error_message,
    )


def error_payload(error_type: str, error_message: str) -> bytes:
    return _JSON.encode({"errorType": error_type, "errorMessage": error_message})


def timed_out(
    request_id: str, phase: str, timeout_s: float, started_at: float, peak_kb: int | None
) -> Outcome:
    error_type = "Sandbox.Timedout"
    error_message = (
        f"RequestId: {request_id} Error: {phase} timed out after {timeout_s:.2f} seconds"
    )
    # As in Lambda's REPORT line, a timed-out call lasted exactly its timeout.
    result = Outcome(
        Status.TIMED_OUT,
        error_payload(error_type, error_message),
        started_at,
        started_at + timeout_s,
        timeout_s * 1000,
        error_type,
        error_message,
    )
    result.max_memory_mb = kb_to_mb(peak_kb)
    return result


def crashed(request_id: str, returncode: int | None, started_at: float, clock: float) -> Outcome:
    exit_code, signum = exit_status(returncode)
    error_type = "Runtime.ExitError"
    error_message = (
        f"RequestId: {request_id} Error: Runtime exited with error: "
        f"{_describe_exit(exit_code, signum)}"
    )
    result = call_outcome(
        Status.CRASHED,
        error_payload(error_type, error_message),
        started_at,
        clock,
        error_type,
        error_message,
    )
    result.exit_code, result.signal = exit_code, signum
    return result


def exit_status(returncode: int | None) -> tuple[int | None, int | None]:
    if returncode is None:
        return None, None
    return (returncode, None) if returncode >= 0 else (None, -returncode)


def _describe_exit(exit_code: int | None, signum: int | None) -> str:
    if signum is not None:
        return f"signal: {(signal.strsignal(signum) or str(signum)).lower()}"
    return f"exit status {exit_code}" if exit_code is not None else "unknown exit status"


def peak_memory_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def kb_to_mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 3)
