def handler(event, context):
    # Raw bytes of JSON nested `depth` deep: bytes go out as they are, however deep, where the
    # worker's own JSON encoder would stop at Python's recursion limit.
    params = event.get("queryStringParameters") or event
    depth = int(params["depth"])
    nested = b"[" * depth + b"]" * depth
    if "rawPath" in event:  # called by a webhook: the API Gateway proxy response shape
        return b'{"statusCode": 200, "body": ' + nested + b"}"
    return nested
