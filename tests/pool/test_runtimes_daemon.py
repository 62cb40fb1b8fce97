"""Node.js and `provided` functions through the real daemon: the Invoke API's answers and
headers, Tail logs with Lambda's REPORT line, the record's metering fields, async invocations
and their retries, exactly as a Python function has them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.daemon_proc import ROOT, running_daemon

FUNCS = ROOT / "functions"
THROWS = """\
exports.handler = async (event) => {
  console.log(`attempt for ${event.n}`);
  throw new TypeError(`bad reading ${event.n}`);
};
"""


def body(tmp_path: Path) -> str:
    throws = tmp_path / "throws"
    throws.mkdir()
    (throws / "index.js").write_text(THROWS)
    return (
        f'[functions.node]\nruntime = "nodejs"\nhandler = "index.handler"\n'
        f'code = "{FUNCS / "hello_node"}"\nmemory_mb = 256\n\n'
        f'[functions.shell]\nruntime = "provided"\nhandler = "function.handler"\n'
        f'code = "{FUNCS / "hello_shell"}"\n\n'
        f'[functions.throws]\nruntime = "nodejs"\nhandler = "index.handler"\n'
        f'code = "{throws}"\nretries = 1\nretry_backoff_s = [0.05, 0.1]\n'
    )


def tail(headers) -> str:
    return base64.b64decode(headers["X-Amz-Log-Result"]).decode()


async def test_sync_invoke_of_node_and_provided_functions(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, body(tmp_path)) as d:
        for round_ in (1, 2):
            status, headers, answer = await d.invoke(
                "node", {"name": "edge"}, headers={"X-Amz-Log-Type": "Tail"}
            )
            assert status == 200, answer
            request_id = headers["x-amzn-RequestId"]
            assert json.loads(answer) == {
                "message": "hello, edge!",
                "warm_calls": round_,
                "request_id": request_id,
            }
            assert headers["X-Amz-Executed-Version"] == "$LATEST"
            logs = tail(headers)
            assert f"greeting edge (call {round_} in worker" in logs
            report = next(line for line in logs.splitlines() if line.startswith("REPORT"))
            assert f"REPORT RequestId: {request_id}\tDuration: " in report
            assert "Memory Size: 256 MB" in report
            assert ("Init Duration: " in report) == (round_ == 1)  # a cold start, then warm
            record = await d.finished(request_id, status="succeeded")
            assert record["function"] == "node" and record["duration_ms"] > 0
            assert record["billed_duration_ms"] >= 1 and record["max_memory_mb"] > 0
            assert (record["init_duration_ms"] is not None) == (round_ == 1)
            assert f"greeting edge (call {round_}" in record["logs"]

        status, headers, answer = await d.invoke("shell", {"x": 1})
        assert status == 200 and json.loads(answer) == {
            "message": "hello from sh",
            "event": {"x": 1},
        }


async def test_async_node_failure_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, body(tmp_path)) as d:
        status, headers, answer = await d.invoke("throws", {"n": 7})
        assert status == 200
        assert headers["X-Amz-Function-Error"] == "Unhandled"
        error = json.loads(answer)
        assert error["errorType"] == "TypeError" and error["errorMessage"] == "bad reading 7"

        status, headers, _ = await d.invoke("throws", {"n": 8}, kind="Event")
        assert status == 202
        request_id = headers["x-amzn-RequestId"]
        await d.wait_log("invocation_dead_lettered", invocation_id=request_id)
        await d.barrier()
        record = await d.get(f"/v1/invocations/{request_id}")
        assert record["status"] == "failed" and record["dead_letter_reason"] == "RetriesExhausted"
        assert [a["status"] for a in record["attempts"]] == ["failed", "failed"]
        assert record["attempts"][-1]["error_type"] == "TypeError"
        assert "attempt for 8" in record["attempts"][-1]["logs"]
        dead = await d.get("/v1/dead-letters")
        assert request_id in {entry["id"] for entry in dead["dead_letters"]}
