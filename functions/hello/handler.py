"""The quick-start function: greets whoever the event names, counts warm calls."""

import os

calls = 0  # module globals persist while the worker stays warm, as in Lambda


def handler(event, context):
    global calls
    calls += 1
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"greeting {name} (call {calls} in worker {os.getpid()})")
    return {
        "message": f"{os.environ.get('GREETING', 'hello')}, {name}!",
        "warm_calls": calls,
        "request_id": context.aws_request_id,
    }
