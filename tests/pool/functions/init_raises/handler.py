raise RuntimeError("init went wrong")


def handler(event, context):
    return {}
