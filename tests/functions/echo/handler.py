import os

calls = 0


def handler(event, context):
    global calls
    calls += 1
    print(f"echo call {calls}")
    return {
        "event": event,
        "pid": os.getpid(),
        "calls": calls,
        "request_id": context.aws_request_id,
        "arn": context.invoked_function_arn,
    }
