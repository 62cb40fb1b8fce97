"""Lambda's wire shapes shared by the Invoke and management calls: errors, names, configurations."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import msgspec
from aiohttp import web

from daemon.config import FunctionConfig
from daemon.store.deploys import Alias, Code

_json = msgspec.json.Encoder()


def lambda_error(
    status: int,
    code: str,
    message: str,
    *,
    kind: str = "User",
    headers: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> web.Response:
    """An error as botocore reads it: the code in x-amzn-ErrorType, message in the body, and a
    request id as every Lambda answer has (`extra` adds fields, such as a 429's `Reason`)."""
    body = {"__type": code, "Type": kind, "Message": message, "message": message, **(extra or {})}
    fields = {"x-amzn-ErrorType": code, "x-amzn-RequestId": str(uuid.uuid4()), **(headers or {})}
    return web.json_response(body, status=status, headers=fields, dumps=dumps)


def dumps(value: Any) -> str:
    return _json.encode(value).decode()


def parse_function_name(raw: str, qualifier: str | None) -> tuple[str, str | None]:
    """Name, `name:qualifier`, a full or partial ARN -> (name, qualifier)."""
    name = unquote(raw)
    parts = name.split(":")
    if name.startswith("arn:") and len(parts) >= 7:
        if parts[2] != "lambda" or parts[5] != "function":
            raise ValueError(f"{name!r} is not the ARN of a Lambda function")
        name, rest = parts[6], parts[7:]
    elif len(parts) >= 3 and parts[1] == "function":
        name, rest = parts[2], parts[3:]
    else:
        name, rest = parts[0], parts[1:]
    if len(rest) > 1 or not name:  # Lambda's own pattern allows one qualifier at most
        raise ValueError(f"{unquote(raw)!r} is not a function name, ARN or name:qualifier")
    inline = rest[0] if rest else None
    if inline and qualifier and inline != qualifier:
        raise ValueError(f"the qualifier in the name ({inline}) and Qualifier ({qualifier}) differ")
    return name, inline or qualifier


def function_configuration(fn: FunctionConfig) -> dict[str, Any]:
    return {
        "FunctionName": fn.name,
        "FunctionArn": fn.arn,
        "Runtime": "python3.11",
        "Handler": fn.handler,
        "Role": "arn:aws:iam::000000000000:role/lambdaemon",
        "Timeout": fn.timeout_s,
        "MemorySize": fn.memory_mb,
        "Version": fn.version,
        "Environment": {"Variables": dict(fn.env)},
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "LoggingConfig": {"LogFormat": "Text", "LogGroup": fn.log_group},
    }


def lambda_time(ts: float) -> str:
    """A time as Lambda's LastModified writes it: 2019-08-14T22:26:11.234+0000."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


def version_configuration(
    fn: FunctionConfig,
    code: Code | None,
    *,
    revision_id: str,
    last_modified: float | None,
    description: str = "",
    qualified: bool = False,
) -> dict[str, Any]:
    """FunctionConfiguration of `fn` (one version of it) with what its code and revision say."""
    config = function_configuration(fn)
    if qualified:
        config["FunctionArn"] = f"{fn.arn}:{fn.version}"
    config["RevisionId"] = revision_id
    config["Description"] = description
    if code is not None:
        config["CodeSha256"], config["CodeSize"] = code.sha256, code.size
    if last_modified is not None:
        config["LastModified"] = lambda_time(last_modified)
    return config


def alias_configuration(fn: FunctionConfig, alias: Alias) -> dict[str, Any]:
    body: dict[str, Any] = {
        "AliasArn": f"{fn.arn}:{alias.name}",
        "Name": alias.name,
        "FunctionVersion": alias.version,
        "Description": alias.description,
        "RevisionId": alias.revision_id,
    }
    if alias.weights:
        body["RoutingConfig"] = {"AdditionalVersionWeights": dict(alias.weights)}
    return body
