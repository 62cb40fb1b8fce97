"""Returns the event it got, so tests can read back what the MQTT source delivered."""


def handler(event, context):
    return {"event": event, "request_id": context.aws_request_id}
