"""Waits until the test opens the gate at $BLOCK_FILE (tests/daemon_proc.py, Gate), so a test
can kill the daemon mid-invocation."""

import fcntl
import os
from pathlib import Path


def handler(event, context):
    gate = os.open(os.environ["BLOCK_FILE"], os.O_RDONLY)
    fcntl.flock(gate, fcntl.LOCK_SH)  # blocks while the test holds the gate shut
    os.close(gate)
    return {"name": event["name"], "size": len(Path(event["path"]).read_bytes())}
