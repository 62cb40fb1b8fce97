"""The chaos test's handler: a no-op that sometimes takes a few ms, and logs every run it starts.

Each run appends its invocation id to $CHAOS_RUNS_FILE before doing anything else, so the test
can count real handler runs (a SIGKILL mid-run still leaves its line) against recorded attempts.
A batch (daemon/batches.py) counts as a run of each of its items: their ids are the records'
`messageId`.
"""

import os
import random
import time

_runs = os.open(os.environ["CHAOS_RUNS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def handler(event, context):
    # One write(2) on an O_APPEND descriptor: lines from concurrent workers never interleave.
    records = event.get("Records") if isinstance(event, dict) else None
    ids = [r["messageId"] for r in records] if records else [context.aws_request_id]
    os.write(_runs, "".join(f"{context.function_name} {i}\n" for i in ids).encode())
    if random.random() < 0.3:
        time.sleep(random.uniform(0.001, 0.008))  # a handler with some real work, now and then
    return {"ok": True}
