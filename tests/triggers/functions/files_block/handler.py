"""Holds the invocation while $BLOCK_FILE exists, so a test can kill the daemon mid-invocation."""

import os
import time
from pathlib import Path


def handler(event, context):
    while os.path.exists(os.environ["BLOCK_FILE"]):
        time.sleep(0.02)
    return {"name": event["name"], "size": len(Path(event["path"]).read_bytes())}
