"""Lambda's management calls for a deploy cycle: code, versions, aliases (daemon/versions.py).

UpdateFunctionCode, PublishVersion, ListVersionsByFunction, Create/Get/Update/Delete/ListAlias,
DeleteFunction of a version, and GetFunction/GetFunctionConfiguration with a Qualifier; plus the
daemon's own /v1/functions/NAME/history and .../aliases/ALIAS/rollback. Every refusal is one of
Lambda's modeled errors (daemon/http/shapes.py lambda_error), never plain text.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from daemon.config import VERSION_NUMBER, FunctionConfig
from daemon.errors import PackageError, UnknownFunctionError
from daemon.http.admin import DISPATCHER, iso
from daemon.http.shapes import (
    alias_configuration,
    dumps,
    function_configuration,
    lambda_error,
    parse_function_name,
    version_configuration,
)
from daemon.untrusted import json_too_deep
from daemon.versions import LATEST, DeployError, Versions, latest_revision

# UpdateFunctionCode's body: the zip in base64 inside JSON (69,905,067 bytes is the base64 of
# 50 MiB, Lambda's own limit) and room for the other fields.
MAX_ZIP_BYTES = 50 * 1024 * 1024  # as daemon/packages.py checks it, before anything is written
MAX_CODE_REQUEST = 69_905_067 + 64 * 1024
MAX_REQUEST = 64 * 1024  # the other management calls' bodies
_PAGE = 50
CODE_PATH = "/2015-03-31/functions/{name}/code"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_management_routes(app: web.Application) -> None:
    fn = "/2015-03-31/functions/{name}"
    app.router.add_get("/2015-03-31/functions", list_functions)
    app.router.add_get("/2015-03-31/functions/", list_functions)
    app.router.add_put(CODE_PATH, update_function_code)
    app.router.add_post(f"{fn}/versions", publish_version)
    app.router.add_get(f"{fn}/versions", list_versions)
    app.router.add_post(f"{fn}/aliases", create_alias)
    app.router.add_get(f"{fn}/aliases", list_aliases)
    app.router.add_get(f"{fn}/aliases/{{alias}}", get_alias)
    app.router.add_put(f"{fn}/aliases/{{alias}}", update_alias)
    app.router.add_delete(f"{fn}/aliases/{{alias}}", delete_alias)
    app.router.add_delete(fn, delete_function)
    app.router.add_get(fn, get_function)
    app.router.add_get(f"{fn}/configuration", get_function)
    app.router.add_get("/v1/functions/{name}/history", function_history)
    app.router.add_post("/v1/functions/{name}/aliases/{alias}/rollback", rollback_alias)


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


def _refuse(status: int, code: str, message: str) -> _Refused:
    return _Refused(lambda_error(status, code, message))


def _call(
    handler: Callable[[web.Request, Versions, FunctionConfig, str | None], Awaitable[web.Response]],
) -> Handler:
    """Resolve the function (name, ARN, `name:qualifier` or `?Qualifier=`) and turn refusals
    into Lambda's errors around `handler`."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        dispatcher = request.app[DISPATCHER]
        try:
            name, qualifier = parse_function_name(
                request.match_info["name"], request.query.get("Qualifier")
            )
            fn = dispatcher.function(name)
            versions = dispatcher.versions
            if versions is None:
                raise _refuse(400, "UnsupportedOperationException", "this daemon keeps no versions")
            return await handler(request, versions, fn, qualifier)
        except ValueError as exc:
            return lambda_error(400, "InvalidParameterValueException", str(exc))
        except UnknownFunctionError as exc:
            return lambda_error(404, "ResourceNotFoundException", f"Function not found: {exc.name}")
        except DeployError as exc:
            return lambda_error(exc.status, exc.code, exc.message)
        except PackageError as exc:
            return lambda_error(exc.status, exc.code, exc.message)
        except _Refused as refused:
            return refused.response

    return wrapped


async def _body(request: web.Request, limit: int = MAX_REQUEST) -> dict[str, Any]:
    """The request's JSON object; a Lambda error for one too large or not an object."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    raw = b"".join(chunks).strip() or b"{}"
    if json_too_deep(raw):
        raise _refuse(400, "InvalidRequestContentException", "the request body is nested too deep")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise _refuse(
            400, "InvalidRequestContentException", f"Could not parse request body into json: {exc}"
        ) from None
    if not isinstance(body, dict):
        raise _refuse(400, "InvalidRequestContentException", "the request body must be an object")
    return body


def _too_large(size: int, limit: int) -> _Refused:
    what = "UpdateFunctionCode" if limit == MAX_CODE_REQUEST else "this"
    return _Refused(
        lambda_error(
            413,
            "RequestEntityTooLargeException",
            f"Request must be smaller than {limit} bytes for the {what} operation (got {size})",
        )
    )


def _field(body: dict[str, Any], key: str, kind: type[Any], default: Any = None) -> Any:
    """`body[key]` when it is a `kind` (or absent: `default`); a Lambda error otherwise."""
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise _refuse(
            400,
            "InvalidParameterValueException",
            f"{key} must be {kind.__name__}, got {type(value).__name__}",
        )
    return value


def _actor(request: web.Request) -> str:
    """Who made a change, as the history says it: the client's product and address."""
    agent = request.headers.get("User-Agent", "").split(" ", 1)[0][:64] or "unknown client"
    return f"{agent} from {request.remote or 'unknown address'}"


def _listing(key: str, items: list[Any], marker: str | None) -> web.Response:
    """A List call's answer: the page's items, and the marker of the next page if there is one."""
    body: dict[str, Any] = {key: items}
    if marker:
        body["NextMarker"] = marker
    return _json(body)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=dumps)


# --- code and versions --------------------------------------------------------------------------


async def _latest_configuration(versions: Versions, fn: FunctionConfig) -> dict[str, Any]:
    deployed = versions.deployed(fn.name)
    code = await versions.code_of(fn)
    when = deployed.deployed_at if deployed and deployed.code.path == fn.code else None
    return version_configuration(fn, code, revision_id=latest_revision(fn), last_modified=when)


def _version_configuration(versions: Versions, fn: FunctionConfig, number: int) -> dict[str, Any]:
    version = versions.version(fn.name, number)
    if version is None:
        raise DeployError(
            "ResourceNotFoundException", f"Function not found: {fn.arn}:{number}", 404
        )
    return version_configuration(
        versions.version_config(fn, number),
        version.code,
        revision_id=version.revision_id,
        last_modified=version.published_at,
        description=version.description,
        qualified=True,
    )


@_call
async def update_function_code(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    if qualifier is not None:
        raise _refuse(400, "InvalidParameterValueException", "only $LATEST's code can be updated")
    body = await _body(request, MAX_CODE_REQUEST)
    for other in ("S3Bucket", "S3Key", "S3ObjectVersion", "ImageUri"):
        if body.get(other):
            raise _refuse(
                400,
                "InvalidParameterValueException",
                f"{other}: lambdaemon takes code as ZipFile only (it reaches no S3 or registry)",
            )
    encoded = _field(body, "ZipFile", str)
    if not encoded:
        raise _refuse(400, "InvalidParameterValueException", "ZipFile is required")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(400, "InvalidParameterValueException", "ZipFile is not base64") from None
    publish = _field(body, "Publish", bool, False)
    revision = _field(body, "RevisionId", str)
    if len(data) > MAX_ZIP_BYTES:
        raise _too_large(len(encoded), MAX_CODE_REQUEST)
    if _field(body, "DryRun", bool, False):  # the request is valid: nothing is deployed
        return _json(await _latest_configuration(versions, fn))
    published = await versions.deploy(
        fn, data, actor=_actor(request), revision_id=revision, publish=publish
    )
    if published is not None:
        return _json(_version_configuration(versions, fn, published.number))
    return _json(await _latest_configuration(versions, request.app[DISPATCHER].function(fn.name)))


@_call
async def publish_version(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    body = await _body(request)
    version = await versions.publish(
        fn,
        actor=_actor(request),
        code_sha256=_field(body, "CodeSha256", str),
        description=_field(body, "Description", str, ""),
        revision_id=_field(body, "RevisionId", str),
    )
    return _json(_version_configuration(versions, fn, version.number), status=201)


def _page(request: web.Request, keys: list[str]) -> tuple[list[str], str | None]:
    """Lambda's paging: MaxItems (1..10,000, default 50) from after an opaque Marker."""
    try:
        limit = int(request.query.get("MaxItems", str(_PAGE)))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 10_000:
        raise _refuse(
            400, "InvalidParameterValueException", "MaxItems must be an integer from 1 to 10000"
        )
    start = 0
    if marker := request.query.get("Marker"):
        try:
            after = base64.urlsafe_b64decode(marker.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            raise _refuse(400, "InvalidParameterValueException", "Marker is not valid") from None
        start = bisect.bisect_right(keys, after)
    page = keys[start : start + limit]
    more = start + limit < len(keys)
    return page, base64.urlsafe_b64encode(page[-1].encode()).decode() if more else None


async def list_functions(request: web.Request) -> web.Response:
    """ListFunctions in name order, paged as Lambda pages; `FunctionVersion=ALL` lists every
    published version after its function's $LATEST."""
    dispatcher = request.app[DISPATCHER]
    functions, versions = dispatcher.functions, dispatcher.versions
    every = request.query.get("FunctionVersion") == "ALL"
    keys = []
    for name in sorted(functions):
        # NUL sorts below every name's characters: the keys stay in order for the marker
        keys.append(f"{name}\x000")
        if every:
            keys += [f"{name}\x00{v.number:010d}" for v in versions.versions(name)]
    try:
        page, marker = _page(request, keys)
    except _Refused as refused:
        return refused.response
    items = []
    for key in page:
        name, _, number = key.rpartition("\x00")
        fn = functions[name]
        if int(number) == 0:
            items.append(function_configuration(fn))
        else:
            items.append(_version_configuration(versions, fn, int(number)))
    return _listing("Functions", items, marker)


@_call
async def list_versions(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    # $LATEST first, then the numbers in order (sortable keys for the marker)
    keys = ["0", *(f"{v.number:010d}" for v in versions.versions(fn.name))]
    page, marker = _page(request, keys)
    items = []
    for key in page:
        if key == "0":
            latest = await _latest_configuration(versions, fn)
            latest["FunctionArn"] = f"{fn.arn}:{LATEST}"
            items.append(latest)
        else:
            items.append(_version_configuration(versions, fn, int(key)))
    return _listing("Versions", items, marker)


@_call
async def get_function(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    """GetFunction and GetFunctionConfiguration, of $LATEST or the qualifier's version."""
    resolved = versions.describe(fn, qualifier)
    if resolved.fn.version == LATEST:
        config = await _latest_configuration(versions, fn)
        code_folder = fn.code
    else:
        config = _version_configuration(versions, fn, int(resolved.fn.version))
        code_folder = resolved.fn.code
    if resolved.alias is not None:
        config["FunctionArn"] = f"{fn.arn}:{resolved.alias.name}"
    if request.path.endswith("/configuration"):
        return _json(config)
    body = {
        "Configuration": config,
        "Code": {"RepositoryType": "lambdaemon", "Location": f"file://{code_folder}"},
        "Concurrency": {"ReservedConcurrentExecutions": fn.concurrency},
    }
    return _json(body)


@_call
async def delete_function(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    if qualifier is None or qualifier == LATEST:
        raise _refuse(
            400,
            "InvalidParameterValueException",
            f"{fn.name} is defined in the config file ({fn.name} stays until it is removed"
            " there); DeleteFunction takes a version Qualifier here",
        )
    if not VERSION_NUMBER.match(qualifier):
        raise _refuse(
            400,
            "InvalidParameterValueException",
            f"DeleteFunction does not delete aliases ({qualifier}): use DeleteAlias",
        )
    await versions.delete_version(fn, int(qualifier), actor=_actor(request))
    return web.Response(status=204, headers={"x-amzn-RequestId": _request_id()})


def _request_id() -> str:
    return str(uuid.uuid4())


# --- aliases --------------------------------------------------------------------------------


def _weights(body: dict[str, Any]) -> dict[str, float] | None:
    routing = _field(body, "RoutingConfig", dict)
    if routing is None:
        return None
    weights = routing.get("AdditionalVersionWeights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in weights.items()
    ):
        raise _refuse(
            400,
            "InvalidParameterValueException",
            "RoutingConfig.AdditionalVersionWeights must map a version to a weight",
        )
    return {k: float(v) for k, v in weights.items()}


@_call
async def create_alias(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    body = await _body(request)
    name = _field(body, "Name", str)
    version = _field(body, "FunctionVersion", str)
    if not name or not version:
        raise _refuse(
            400, "InvalidParameterValueException", "Name and FunctionVersion are required"
        )
    alias = await versions.put_alias(
        fn,
        name,
        actor=_actor(request),
        version=version,
        weights=_weights(body) or {},
        description=_field(body, "Description", str, ""),
        create=True,
    )
    return _json(alias_configuration(fn, alias), status=201)


@_call
async def list_aliases(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    only = request.query.get("FunctionVersion")
    aliases = {a.name: a for a in versions.aliases(fn.name) if only in (None, a.version)}
    page, marker = _page(request, sorted(aliases))
    return _listing("Aliases", [alias_configuration(fn, aliases[n]) for n in page], marker)


@_call
async def get_alias(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    return _json(alias_configuration(fn, versions.alias(fn, request.match_info["alias"])))


@_call
async def update_alias(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    body = await _body(request)
    alias = await versions.put_alias(
        fn,
        request.match_info["alias"],
        actor=_actor(request),
        version=_field(body, "FunctionVersion", str),
        weights=_weights(body),
        description=_field(body, "Description", str),
        revision_id=_field(body, "RevisionId", str),
        create=False,
    )
    return _json(alias_configuration(fn, alias))


@_call
async def delete_alias(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    await versions.delete_alias(fn, request.match_info["alias"], actor=_actor(request))
    return web.Response(status=204, headers={"x-amzn-RequestId": _request_id()})


# --- the daemon's own: history and rollback ----------------------------------------------------


@_call
async def function_history(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    limit = _integer(request, "limit", 100)
    if not 1 <= limit <= 1000:
        raise _refuse(400, "InvalidParameterValueException", "limit is an integer from 1 to 1000")
    before = _integer(request, "before", 0) if "before" in request.query else None
    if before is not None and not 1 <= before < 2**62:  # an entry's id: SQLite's integer range
        raise _refuse(
            400, "InvalidParameterValueException", "before is a history entry's id (from next)"
        )
    changes = await versions.history(fn.name, limit, before)
    rows = [
        {
            "id": c.id,
            "at": iso(c.at),
            "action": c.action,
            "actor": c.actor,
            "version": c.version,
            "alias": c.alias,
            "previous": c.previous,
            "detail": c.detail,
        }
        for c in changes
    ]
    body: dict[str, Any] = {"function": fn.name, "history": rows}
    if len(rows) == limit:
        body["next"] = rows[-1]["id"]
    return _json(body)


def _integer(request: web.Request, key: str, default: int) -> int:
    """The query's `key` as an integer; -1 (out of every range) when it is not one."""
    try:
        return int(request.query.get(key, str(default)))
    except ValueError:
        return -1


@_call
async def rollback_alias(
    request: web.Request, versions: Versions, fn: FunctionConfig, qualifier: str | None
) -> web.Response:
    alias = await versions.rollback(fn, request.match_info["alias"], actor=_actor(request))
    return _json(alias_configuration(fn, alias))
