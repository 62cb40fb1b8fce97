"""A webhook example: echoes the request's method, path, query and body back as JSON.

Wire it to a route with `{ type = "webhook", path = "/echo", methods = ["GET", "POST"] }`.
The returned dict has a statusCode, so it is a structured response (Lambda's Function URL rules):
its headers, cookies and body become the HTTP response.
"""

import base64
import json


def handler(event, context):
    body = event.get("body")
    if body is not None and event.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    http = event["requestContext"]["http"]
    echo = {
        "method": http["method"],
        "path": event["rawPath"],
        "query": event.get("queryStringParameters", {}),
        "body": body,
        "request_id": context.aws_request_id,
    }
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json", "x-echo-method": http["method"]},
        "cookies": ["echoed=1; Path=/; HttpOnly"],
        "body": json.dumps(echo),
    }
