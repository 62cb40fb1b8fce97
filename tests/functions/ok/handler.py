def handler(event, context):
    return {"ok": True, "request_id": context.aws_request_id}
