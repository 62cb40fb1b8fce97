raise RuntimeError("i" * (10 * 1024 * 1024))  # an init error whose JSON is over the limit


def handler(event, context):
    return {}
