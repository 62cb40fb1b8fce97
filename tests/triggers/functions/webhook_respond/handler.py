import json


def handler(event, context):
    # Returns whatever the request body asks for: one handler covers every response shape.
    return json.loads(event["body"])
