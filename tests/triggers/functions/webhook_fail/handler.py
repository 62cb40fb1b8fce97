import time


def handler(event, context):
    if event["rawPath"].endswith("/hang"):
        time.sleep(30)  # far past the function's timeout
    raise RuntimeError("SECRET-DETAIL: database password is hunter2")
