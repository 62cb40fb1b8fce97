"""Reads the dropped file and reports what it saw, so tests can check the content was whole."""

import hashlib
from pathlib import Path


def handler(event, context):
    data = Path(event["path"]).read_bytes()
    return {
        "name": event["name"],
        "text": data.decode(errors="replace"),
        "size_ok": len(data) == event["size"],
        "sha256_ok": hashlib.sha256(data).hexdigest() == event["sha256"],
    }
