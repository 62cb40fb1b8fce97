"""Chains to a sibling function with the AWS SDK, unchanged from Lambda: no endpoint, no keys.

Also reports what the same credentials get from the daemon's admin API (`admin`), from a read
of Lambda's API (`read`) and from a change (`change`: creating an alias)."""

import json
import os
import urllib.error
import urllib.request

import boto3
from botocore.exceptions import ClientError


def handler(event, context):
    client = boto3.client("lambda")
    try:
        answer = client.invoke(
            FunctionName=event["target"],
            Payload=json.dumps({"from": context.function_name}).encode(),
        )
    except ClientError as exc:
        return {"error": exc.response["Error"]["Code"]}
    return {
        "status": answer["StatusCode"],
        "payload": json.loads(answer["Payload"].read()),
        "admin": admin_status(),
        "read": attempt(lambda: client.get_function(FunctionName=event["target"])),
        "change": attempt(
            lambda: client.create_alias(
                FunctionName=event["target"], Name="from-chain", FunctionVersion="$LATEST"
            )
        ),
    }


def attempt(call):
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"]
    return "ok"


def admin_status():
    request = urllib.request.Request(
        os.environ["AWS_ENDPOINT_URL_LAMBDA"] + "/v1/functions",
        headers={"Authorization": "Bearer " + os.environ["AWS_ACCESS_KEY_ID"]},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
