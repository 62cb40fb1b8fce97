"""A batch handler driven by its records: it appends the batch it got to $BATCH_LOG, waits on
$BATCH_GATE (a shared flock the test holds) when set, raises when a record's payload says
"raise", and reports as failed each record whose payload says "fail"."""

import fcntl
import json
import os


def _payload(record):
    # mqtt: the decoded payload; files: the file's content, read from the path it names.
    if "payload" in record:
        return record["payload"]
    with open(record["path"]) as file:
        return json.loads(file.read())


def handler(event, context):
    records = event["Records"]
    with open(os.environ["BATCH_LOG"], "a") as log:
        log.write(json.dumps({"id": context.aws_request_id, "records": records}) + "\n")
    if gate := os.environ.get("BATCH_GATE"):
        with open(gate) as file:
            fcntl.flock(file, fcntl.LOCK_SH)
    payloads = [_payload(r) for r in records]
    if any(isinstance(p, dict) and p.get("do") == "raise" for p in payloads):
        raise RuntimeError("a record asked the whole batch to fail")
    failures = [
        {"itemIdentifier": r["messageId"]}
        for r, p in zip(records, payloads, strict=True)
        if isinstance(p, dict) and p.get("do") == "fail"
    ]
    if any(isinstance(p, dict) and p.get("do") == "bad-id" for p in payloads):
        failures.append({"itemIdentifier": "no-such-item"})
    return {"batchItemFailures": failures}
