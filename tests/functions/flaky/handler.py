"""Fails its first attempts the way the event says, then succeeds.

event = {"dir": folder, "fail": ["raise" | "exit" | "hang", ...]}: attempt n fails by fail[n-1];
past the list it returns {"attempt": n}. Attempts are counted in a file per invocation id, so a
crash or a timeout (which end the worker) does not reset the count.
"""

import os
import time
from pathlib import Path


def handler(event, context):
    folder = Path(event["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / context.aws_request_id).open("a") as calls:
        calls.write("x")
        attempt = calls.tell()
    modes = event.get("fail", [])
    if attempt <= len(modes):
        mode = modes[attempt - 1]
        print(f"attempt {attempt} fails by {mode}", flush=True)
        if mode == "exit":
            os._exit(3)
        if mode == "hang":
            time.sleep(60)
        raise RuntimeError(f"attempt {attempt} failed")
    print(f"attempt {attempt} succeeds")
    return {"attempt": attempt}
