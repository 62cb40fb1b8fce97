import json


def handler(event, context):
    # The whole event as the response body, so a test can check its exact shape.
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({"event": event, "request_id": context.aws_request_id}),
    }
