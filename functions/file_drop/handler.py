"""Example files-trigger handler: summarise each dropped text file into $OUT_DIR/<name>.json.

The event is {"path", "name", "size", "mtime", "sha256"}; `path` is the claimed file under
`<watched folder>/.processing/`, readable until the invocation ends, then moved to done/ or
failed/. Handlers run at least once: the result is written atomically under a name derived from
the input, so a re-run after a crash overwrites it instead of adding a second one.
"""

import hashlib
import json
import os
from pathlib import Path


def handler(event, context):
    source = Path(event["path"])
    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != event["sha256"]:
        raise ValueError(f"{event['name']} changed after it was claimed")
    text = data.decode("utf-8", errors="replace")
    summary = {
        "name": event["name"],
        "bytes": len(data),
        "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
        "words": len(text.split()),
        "sha256": event["sha256"],
        "mtime": event["mtime"],
        "invocation_id": context.aws_request_id,
    }
    # Default: an out/ folder next to the watched one (never inside it, or it would be re-read).
    out_dir = Path(os.environ.get("OUT_DIR") or source.parent.parent.parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{event['name']}.json"
    partial = out_dir / f".{event['name']}.json.tmp"
    partial.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return summary
