"""The chaos test's handler: a no-op that sometimes takes a few ms, and logs every run it starts.

Each run appends its invocation id to $CHAOS_RUNS_FILE before doing anything else, so the test
can count real handler runs (a SIGKILL mid-run still leaves its line) against recorded attempts.
"""

import os
import random
import time

_runs = os.open(os.environ["CHAOS_RUNS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def handler(event, context):
    # One write(2) on an O_APPEND descriptor: lines from concurrent workers never interleave.
    os.write(_runs, f"{context.function_name} {context.aws_request_id}\n".encode())
    if random.random() < 0.3:
        time.sleep(random.uniform(0.001, 0.008))  # a handler with some real work, now and then
    return {"ok": True}
