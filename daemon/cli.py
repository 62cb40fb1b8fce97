"""The `lambdaemon` command line: the only place that parses arguments, handles signals, exits."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from daemon.config import ApiSettings, Config, config_path, load_config
from daemon.credentials import read_secret
from daemon.errors import (
    ApiError,
    ConfigError,
    LambdaemonError,
    StoreOpenError,
    StoreUnavailableError,
)

EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 64, 65, 69, 70, 78


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # `--config` and `--json` may come before the command too (`lambdaemon --config F run`).
    args.config = args.config or args.global_config
    args.json = getattr(args, "json", False) or args.global_json
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        # `reload` of a broken file still asks the daemon, which refuses it (logged, with the
        # same reason) and keeps running the old config.
        fallback = _api_settings_only(path) if args.command is cmd_reload else None
        if fallback is None:
            print(f"lambdaemon: config error: {exc}", file=sys.stderr)
            return EX_CONFIG
        config = fallback
    try:
        code: int = args.command(config, args)
        return code
    except ApiError as exc:
        print(f"lambdaemon: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="config file (default: $LAMBDAEMON_CONFIG, else config/example.toml)"
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser = argparse.ArgumentParser(
        prog="lambdaemon", description="A Lambda-grade function runtime for edge hardware."
    )
    parser.add_argument("--config", dest="global_config", help="config file, here or after COMMAND")
    parser.add_argument("--json", dest="global_json", action="store_true", help="JSON output")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon").set_defaults(command=cmd_run)
    sub.add_parser("check", parents=[common], help="validate the config and exit").set_defaults(
        command=cmd_check
    )
    p = sub.add_parser(
        "reload",
        parents=[common],
        help="make the running daemon re-read its config file (as SIGHUP does)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="apply a config that would be refused as an accident (empty, no functions left)",
    )
    p.set_defaults(command=cmd_reload)
    p = sub.add_parser(
        "invoke", parents=[common], help="invoke a function through the running daemon"
    )
    p.add_argument("name")
    p.add_argument(
        "payload", nargs="?", default="{}", help="event JSON, or - to read it from stdin"
    )
    p.add_argument(
        "--async", dest="is_async", action="store_true", help="queue it (Event) and print the id"
    )
    p.set_defaults(command=cmd_invoke)
    sub.add_parser("functions", parents=[common], help="list functions").set_defaults(
        command=cmd_functions
    )
    sub.add_parser(
        "nodes", parents=[common], help="list the store's nodes (a fleet's) and their load"
    ).set_defaults(command=cmd_nodes)
    _history_parser(sub, common)
    p = sub.add_parser("show", parents=[common], help="show one invocation in full")
    p.add_argument("id")
    p.set_defaults(command=cmd_show)
    p = sub.add_parser(
        "replay",
        parents=[common],
        help="run a recorded invocation's event again, as a new async invocation",
    )
    p.add_argument("id")
    p.set_defaults(command=cmd_replay)
    _dlq_parser(sub, common)
    p = sub.add_parser(
        "logs", parents=[common], help="a function's log lines; -f follows them as they happen"
    )
    p.add_argument("name", nargs="?", help="the function (default: every function)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--since", default="10m", help="10m, 1h, 7d or an RFC 3339 time (10m)")
    p.add_argument("--status", help="only invocations that ended so (failed, timed_out, ...)")
    p.set_defaults(command=cmd_logs)
    _deploy_parser(sub, common)
    return parser


def _history_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    times = "RFC 3339 (2026-12-04T18:00:00Z), a date (UTC) or an age (30m, 1h, 7d)"
    p = sub.add_parser(
        "invocations",
        parents=[common],
        help="list invocations, newest first, by function, status, trigger, time or version",
    )
    p.add_argument("--function", help="only this function's")
    p.add_argument("--status", help="queued, running, succeeded, failed, timed_out or crashed")
    p.add_argument("--trigger", help="api, webhook, cron, mqtt, files, replay, destination")
    p.add_argument("--since", help=f"accepted at or after: {times}")
    p.add_argument("--until", help=f"accepted before: {times}")
    p.add_argument("--version", help="the version it ran: $LATEST or a number")
    p.add_argument("--id", help="one invocation (request id)")
    p.add_argument("--limit", type=int, default=20, help="rows per page, 1 to 1000 (default 20)")
    p.add_argument("--all", action="store_true", help="print every page, not just the first")
    p.set_defaults(command=cmd_invocations)
    p = sub.add_parser(
        "usage",
        parents=[common],
        help="what the functions used (requests, errors, billed time, GB-seconds) and what"
        " AWS Lambda would charge for it",
    )
    p.add_argument("--since", default="30d", help=f"from this day on (default 30d): {times}")
    p.add_argument("--by", choices=["day", "function"], default="day", help="one row per ...")
    p.set_defaults(command=cmd_usage)


def _deploy_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "deploy",
        parents=[common],
        help="make a folder or zip the function's $LATEST code (UpdateFunctionCode)",
    )
    p.add_argument("name")
    p.add_argument("package", metavar="DIR|ZIP", help="a code folder (zipped here) or a .zip")
    p.add_argument("--publish", action="store_true", help="publish it as a new version too")
    p.set_defaults(command=cmd_deploy)
    p = sub.add_parser("versions", parents=[common], help="list a function's published versions")
    p.add_argument("name")
    p.set_defaults(command=cmd_versions)
    p = sub.add_parser(
        "alias",
        parents=[common],
        help="point an alias at a version (created when missing), optionally as a canary",
    )
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", help="a version number or $LATEST")
    p.add_argument(
        "--weight",
        metavar="V=W",
        help="send a share W (0..1) of the alias's calls to version V, e.g. --weight 3=0.1",
    )
    p.set_defaults(command=cmd_alias)
    p = sub.add_parser(
        "rollback",
        parents=[common],
        help="move an alias back one step: drop its canary, else its previous version",
    )
    p.add_argument("name")
    p.add_argument("alias")
    p.set_defaults(command=cmd_rollback)
    p = sub.add_parser(
        "history", parents=[common], help="a function's deploys, versions and alias changes"
    )
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(command=cmd_history)


def _dlq_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    # `common` goes on the leaves only: on both levels, the group's defaults would overwrite
    # what the user gave the leaf.
    p = sub.add_parser(
        "mqtt-drain",
        parents=[common],
        help="take over a share-group node's MQTT session that will not come back, and store"
        " what the broker holds for it",
    )
    p.add_argument("client_id", help="the dead node's [mqtt] client_id")
    p.set_defaults(command=cmd_mqtt_drain)
    dlq = sub.add_parser("dlq", help="dead letters: async invocations that never succeeded")
    actions = dlq.add_subparsers(required=True, metavar="ACTION")
    p = actions.add_parser("list", parents=[common], help="list dead letters, newest first")
    p.add_argument("--function")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(command=cmd_dlq_list)
    p = actions.add_parser("show", parents=[common], help="show one dead letter in full")
    p.add_argument("id")
    p.set_defaults(command=cmd_dlq_show)
    p = actions.add_parser(
        "redrive", parents=[common], help="queue dead letters again with a fresh retry budget"
    )
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="every dead letter (of --function)")
    p.add_argument("--function", help="with --all: only this function's")
    p.set_defaults(command=cmd_dlq_redrive)


# --- run and check --------------------------------------------------------------------------


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    store = "sqlite"
    if config.store.url is not None:
        # The one command that asks the server: a refused login is a config error (78), a
        # server that does not answer is not (69), and each says which.
        from daemon.store.postgres import probe

        try:
            store = f"postgresql {probe(config)}"
        except ConfigError as exc:
            print(f"lambdaemon: config error: {exc}", file=sys.stderr)
            return EX_CONFIG
        except StoreUnavailableError as exc:
            print(f"lambdaemon: {exc}", file=sys.stderr)
            return EX_UNAVAILABLE
    from daemon.bubblewrap import describe

    sandboxed = sorted(name for name, fn in config.functions.items() if fn.sandbox)
    if args.json:
        functions = sorted(config.functions)
        print(
            json.dumps(
                {
                    "config": config.path,
                    "ok": True,
                    "functions": functions,
                    "store": store,
                    "sandbox": {**describe(), "functions": sandboxed},
                }
            )
        )
    else:
        names = ", ".join(sorted(config.functions))
        print(f"{config.path}: ok ({len(config.functions)} functions: {names}; store: {store})")
        sandbox = describe()
        if sandbox["available"]:
            print(f"sandbox: available; sandboxed: {', '.join(sandboxed) or 'none'}")
        else:
            print(f"sandbox: not available: {sandbox['reason']}; every function runs without one")
    return 0


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from daemon.logs import configure_logging
    from daemon.memory import keep_heap_small
    from daemon.resources import raise_nofile_limit

    keep_heap_small()  # big results' buffers go back to the kernel once freed
    configure_logging(config.daemon.log_level)
    raise_nofile_limit()  # before anything opens descriptors; logs the limits once
    _log_sandbox(config)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(config.daemon.event_loop)) as runner:
            runner.run(_serve(config))
    except ConfigError as exc:  # the data_dir it names cannot be used (daemon/datadir.py)
        print(f"lambdaemon: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StoreOpenError as exc:
        print(f"lambdaemon: {exc}", file=sys.stderr)
        return EX_DATAERR
    except StoreUnavailableError as exc:  # [store] url names a server that does not answer
        print(f"lambdaemon: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except LambdaemonError as exc:
        print(f"lambdaemon: {exc}", file=sys.stderr)
        return EX_SOFTWARE
    return 0


def _log_sandbox(config: Config) -> None:
    """Say at start whether workers can be sandboxed, and which are (daemon/pool/sandbox.py)."""
    import structlog

    from daemon.bubblewrap import describe

    sandbox = describe()
    sandboxed = sorted(name for name, fn in config.functions.items() if fn.sandbox)
    log = structlog.get_logger("lambdaemon.pool")
    if sandbox["available"]:
        log.info("sandbox", available=True, functions=sandboxed)
    else:  # [daemon] sandbox = "auto" (the default) turned it off: every worker runs plain
        log.warning("sandbox", available=False, reason=sandbox["reason"], functions=sandboxed)


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for `auto` and `uvloop` (config checking made sure it exists), or None:
    asyncio's own. uvloop runs the same code with its transports and timers in C, so the
    daemon's loop spends less CPU per request (docs/benchmarks.md)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(config: Config) -> None:
    from daemon.resources import LoopExceptionHandler
    from daemon.service import Service

    service = Service(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # accept() failing for want of descriptors: one quiet line, not a traceback per connection
    loop.set_exception_handler(LoopExceptionHandler())

    def on_signal(signum: int) -> None:
        if stop.is_set():
            service.skip_drain.set()  # a second signal skips the wait for in-flight work
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, service.request_reload)  # the outcome is logged
    await service.run(stop)


def cmd_reload(config: Config, args: argparse.Namespace) -> int:
    headers = {"Content-Type": "application/json"}
    payload = json.dumps({"force": True} if args.force else {}).encode()
    status, _, body = _request(config, "POST", "/v1/reload", payload, headers)
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        data = {"error": body.decode("utf-8", "replace") or f"HTTP {status}"}
    if args.json:
        print(json.dumps(data, indent=2))
    if status >= 400 or not data.get("reloaded"):
        if not args.json:
            print(f"lambdaemon: reload refused: {data.get('error') or status}", file=sys.stderr)
        return EX_CONFIG if data.get("config_error") else 1
    if not args.json:
        print(f"{data.get('config')}: reloaded")
        for key, value in data.items():
            if isinstance(value, list) and value:
                print(f"  {key.replace('_', ' ')}: {', '.join(value)}")
    return 0


def _api_settings_only(path: Any) -> Config | None:
    """A config holding just the file's [api] section (enough to reach the daemon), or None."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        api = msgspec.convert(raw.get("api", {}), ApiSettings)
    except (OSError, ValueError):  # TOMLDecodeError, msgspec.ValidationError, UnicodeDecodeError
        return None
    return Config(api=api, path=str(path.resolve()))


# --- talking to the running daemon ----------------------------------------------------------


def _request(
    config: Config,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    try:
        with _open(config, path, method, body, headers, timeout=960) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _open(
    config: Config,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float | None = None,
) -> Any:
    """The daemon's answer to a request, open to read as it comes (an HTTPError for 4xx/5xx)."""
    host, port = config.api.listen.rsplit(":", 1)
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"
    headers = dict(headers or {})
    if config.api.token_file:
        headers["Authorization"] = "Bearer " + read_secret(
            config, config.api.token_file, "api.token_file"
        )
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(
            f"cannot reach the daemon at {url}: {reason} (is `lambdaemon run` running?)"
        ) from None


def _get_json(config: Config, path: str) -> Any:
    status, _, body = _request(config, "GET", path)
    data = json.loads(body or b"{}")
    if status >= 400:
        raise ApiError(data.get("error") or data.get("message") or f"HTTP {status}")
    return data


def cmd_invoke(config: Config, args: argparse.Namespace) -> int:
    payload = sys.stdin.buffer.read() if args.payload == "-" else args.payload.encode()
    kind = "Event" if args.is_async else "RequestResponse"
    path = f"/2015-03-31/functions/{urllib.parse.quote(args.name, safe='')}/invocations"
    status, headers, body = _request(config, "POST", path, payload, {"X-Amz-Invocation-Type": kind})
    request_id = headers.get("x-amzn-RequestId") or headers.get("X-Amzn-RequestId", "")
    if status >= 400:
        try:
            message = json.loads(body).get("message", body.decode())
        except ValueError:
            message = body.decode("utf-8", "replace")
        print(f"lambdaemon: {headers.get('x-amzn-ErrorType', status)}: {message}", file=sys.stderr)
        return 1
    if args.is_async:
        print(
            json.dumps({"invocation_id": request_id, "status": "queued"})
            if args.json
            else request_id
        )
        return 0
    print(body.decode("utf-8", "replace"))
    if "X-Amz-Function-Error" in headers:
        print(f"lambdaemon: invocation {request_id} failed", file=sys.stderr)
        return 1
    return 0


def cmd_functions(config: Config, args: argparse.Namespace) -> int:
    rows = _get_json(config, "/v1/functions")["functions"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["name", "handler", "timeout_s", "memory_mb", "concurrency", "running", "backlog"]
    _print_table(
        rows,
        columns,
        extra=lambda r: {"triggers": ",".join(t["type"] for t in r["triggers"]) or "-"},
    )
    return 0


def cmd_nodes(config: Config, args: argparse.Namespace) -> int:
    rows = _get_json(config, "/v1/nodes")["nodes"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["node_id", "state", "host", "started_at", "lease_until", "running", "queued", "free"]
    _print_table([{**row, **(row["load"] or {})} for row in rows], columns)
    return 0


_INVOCATION_COLUMNS = [
    "id",
    "function",
    "trigger",
    "status",
    "attempt",
    "queued_at",
    "duration_ms",
    "error_type",
]


def cmd_invocations(config: Config, args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)}
    for name in ("function", "status", "trigger", "since", "until", "version", "id"):
        if getattr(args, name):
            query[name] = getattr(args, name)
    rows: list[dict[str, Any]] = []
    while True:
        page = _get_json(config, "/v1/invocations?" + urllib.parse.urlencode(query))
        if args.all and not args.json:  # page by page: --all over a big store streams
            _print_table(
                page["invocations"],
                _with_node(_INVOCATION_COLUMNS, page["invocations"]),
                header=not rows,
            )
        rows += page["invocations"]
        if not args.all or page.get("next") is None:
            break
        query["cursor"] = page["next"]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not args.all:
        _print_table(rows, _with_node(_INVOCATION_COLUMNS, rows))
    return 0


def _with_node(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """`columns` and `node` when a row names one: a fleet's records (on SQLite, none do)."""
    return [*columns, "node"] if any(row.get("node") for row in rows) else columns


def cmd_usage(config: Config, args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"since": args.since, "by": args.by})
    data = _get_json(config, "/v1/usage?" + query)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [*data["usage"], {args.by: "total", **data["total"]}]
    for row in rows:
        row["cost_usd"] = f"{row['cost_usd']['total']:.6f}"
        row["duration_s"] = f"{row['duration_ms'] / 1000:.3f}"
        row["billed_s"] = f"{row['billed_duration_ms'] / 1000:.3f}"
        row["gb_seconds"] = f"{row['gb_seconds']:.3f}"
    columns = [args.by, "requests", "errors", "duration_s", "billed_s", "gb_seconds", "cost_usd"]
    _print_table(rows, columns)
    prices = data["prices"]
    print(
        f"since {data['since']} (UTC days); priced at ${prices['per_request_usd']} per request"
        f" and ${prices['per_gb_second_usd']} per GB-second ({prices['defaults']} by default)"
    )
    return 0


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    return _show(config, args, f"/v1/invocations/{urllib.parse.quote(args.id, safe='')}")


def _show(config: Config, args: argparse.Namespace, path: str) -> int:
    status, _, body = _request(config, "GET", path)
    if status == 404:
        print(f"lambdaemon: {json.loads(body).get('error', 'not found')}", file=sys.stderr)
        return 1
    record = json.loads(body)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    logs = record.pop("logs", "") or ""
    for key, value in record.items():
        if key not in ("attempts", "items"):
            print(f"{key:>20}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    attempts = record.get("attempts") or []
    if len(attempts) > 1:  # a retried invocation: what each attempt came to
        print("            attempts:")
        columns = ["attempt", "status", "started_at", "duration_ms", "error_type", "error_message"]
        if any(a.get("batch_id") for a in attempts):  # each attempt ran in a batch
            columns.append("batch_id")
        columns = _with_node(columns, attempts)
        _print_table(attempts, columns)
    if items := record.get("items"):  # a batch invocation: what each of its items came to
        print("               items:")
        _print_table(items, ["invocation_id", "attempt", "status", "error_type"])
    if logs:
        print("                logs:")
        for line in logs.splitlines():
            print(f"    {line}")
    return 0


def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    path = f"/v1/invocations/{urllib.parse.quote(args.id, safe='')}/replay"
    data = _post_json(config, path, {})
    if data is None:
        return 1
    print(json.dumps(data) if args.json else data["invocation_id"])
    return 0


def cmd_mqtt_drain(config: Config, args: argparse.Namespace) -> int:
    data = _post_json(config, "/v1/mqtt/drain", {"client_id": args.client_id})
    if data is None:
        return 1
    if args.json:
        print(json.dumps(data))
    elif not data["session_present"]:
        print(f"{data['client_id']}: the broker had no session of that client id")
    else:
        print(f"{data['client_id']}: drained, {data['messages']} messages taken")
    return 0


def cmd_dlq_list(config: Config, args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit), **({"function": args.function} if args.function else {})}
    rows = _get_json(config, "/v1/dead-letters?" + urllib.parse.urlencode(query))["dead_letters"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = [
        "id",
        "function",
        "status",
        "dead_letter_reason",
        "attempt",
        "dead_lettered_at",
        "error_type",
    ]
    _print_table(rows, _with_node(columns, rows))
    return 0


def cmd_dlq_show(config: Config, args: argparse.Namespace) -> int:
    return _show(config, args, f"/v1/dead-letters/{urllib.parse.quote(args.id, safe='')}")


def cmd_dlq_redrive(config: Config, args: argparse.Namespace) -> int:
    if bool(args.ids) == args.all:
        print("lambdaemon: give dead-letter IDs or --all", file=sys.stderr)
        return EX_USAGE
    body: dict[str, Any] = {"all": True} if args.all else {"ids": args.ids}
    if args.function:
        body["function"] = args.function
    data = _post_json(config, "/v1/dead-letters/redrive", body)
    if data is None:
        return 1
    if args.json:
        print(json.dumps(data))
    else:
        for invocation_id in data["redriven"]:
            print(invocation_id)
        for invocation_id in data["not_redriven"]:
            print(
                f"lambdaemon: {invocation_id} is not a dead letter of a configured function",
                file=sys.stderr,
            )
    return 1 if data["not_redriven"] else 0


def cmd_logs(config: Config, args: argparse.Namespace) -> int:
    """Print log lines as `sam logs` does: time, then the line; --json the objects."""
    query = {"since": args.since, "follow": "1" if args.follow else "0"}
    if args.name:
        query["function"] = args.name
    if args.status:
        query["status"] = args.status
    path = "/v1/logs?" + urllib.parse.urlencode(query)
    try:
        with _open(config, path) as response:
            for raw in response:
                line = json.loads(raw)
                if args.json:
                    print(json.dumps(line), flush=True)
                    continue
                if line.get("missed"):
                    print(f"lambdaemon: {line['missed']} lines missed", file=sys.stderr)
                    continue
                when = datetime.fromtimestamp(line["time"], UTC).isoformat(timespec="milliseconds")
                name = "" if args.name else f"{line['function']}  "
                print(f"{when.replace('+00:00', 'Z')}  {name}{line['line']}", flush=True)
    except urllib.error.HTTPError as exc:
        message = json.loads(exc.read() or b"{}").get("error", exc.reason)
        print(f"lambdaemon: {message}", file=sys.stderr)
        return 1
    return 0


# --- deploys, versions and aliases (Lambda's management API) ---------------------------------


_USER_AGENT = "lambdaemon-cli"


def _lambda_call(
    config: Config,
    method: str,
    path: str,
    payload: dict[str, Any] | None = None,
    *,
    quiet: bool = False,
) -> tuple[int, Any]:
    """One call of the daemon's Lambda API: (status, JSON answer); a refusal is printed
    unless `quiet`."""
    headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT}
    body = json.dumps(payload).encode() if payload is not None else None
    status, got, raw = _request(config, method, path, body, headers)
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        data = {"message": raw.decode("utf-8", "replace")}
    if status >= 400 and not quiet:
        code = got.get("x-amzn-ErrorType") or got.get("X-Amzn-Errortype") or f"HTTP {status}"
        print(f"lambdaemon: {code}: {data.get('message') or data.get('error')}", file=sys.stderr)
    return status, data


def _function_path(name: str) -> str:
    return f"/2015-03-31/functions/{urllib.parse.quote(name, safe='')}"


def cmd_deploy(config: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from daemon.packages import zip_folder

    source = Path(args.package)
    try:
        data = zip_folder(source) if source.is_dir() else source.read_bytes()
    except (OSError, ValueError) as exc:
        print(f"lambdaemon: cannot read {source}: {exc}", file=sys.stderr)
        return EX_DATAERR
    payload = {"ZipFile": base64.b64encode(data).decode(), "Publish": args.publish}
    status, data_out = _lambda_call(config, "PUT", f"{_function_path(args.name)}/code", payload)
    if status >= 400:
        return 1
    if args.json:
        print(json.dumps(data_out, indent=2))
    else:
        print(
            f"deployed {args.name}: version {data_out['Version']},"
            f" CodeSha256 {data_out['CodeSha256']}, {data_out['CodeSize']} bytes"
        )
    return 0


def cmd_versions(config: Config, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    marker = None
    while True:
        query = "?" + urllib.parse.urlencode({"Marker": marker}) if marker else ""
        status, page = _lambda_call(config, "GET", f"{_function_path(args.name)}/versions{query}")
        if status >= 400:
            return 1
        rows += page["Versions"]
        marker = page.get("NextMarker")
        if not marker:
            break
    status, aliases = _lambda_call(config, "GET", f"{_function_path(args.name)}/aliases")
    if status >= 400:
        return 1
    names: dict[str, list[str]] = {}
    for alias in aliases["Aliases"]:
        names.setdefault(alias["FunctionVersion"], []).append(alias["Name"])
        for extra, weight in (
            alias.get("RoutingConfig", {}).get("AdditionalVersionWeights", {}).items()
        ):
            names.setdefault(extra, []).append(f"{alias['Name']}({weight:g})")
    if args.json:
        print(json.dumps({"versions": rows, "aliases": aliases["Aliases"]}, indent=2))
        return 0
    table = [
        {
            "version": v["Version"],
            "code_sha256": v.get("CodeSha256"),
            "size": v.get("CodeSize"),
            "modified": v.get("LastModified"),
            "aliases": ",".join(names.get(v["Version"], [])) or None,
            "description": v.get("Description") or None,
        }
        for v in rows
    ]
    _print_table(table, ["version", "code_sha256", "size", "modified", "aliases", "description"])
    return 0


def cmd_alias(config: Config, args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"FunctionVersion": args.version}
    if args.weight is not None:
        extra, sep, weight = args.weight.partition("=")
        try:
            share = float(weight)
        except ValueError:
            share = -1.0
        if not sep or not extra or not 0 <= share <= 1:
            print(f"lambdaemon: --weight {args.weight!r} is not VERSION=SHARE", file=sys.stderr)
            return EX_USAGE
        payload["RoutingConfig"] = {"AdditionalVersionWeights": {extra: share}}
    else:
        payload["RoutingConfig"] = {"AdditionalVersionWeights": {}}
    path = f"{_function_path(args.name)}/aliases/{urllib.parse.quote(args.alias, safe='')}"
    exists, _ = _lambda_call(config, "GET", path, quiet=True)
    if exists == 404:
        create = {"Name": args.alias, **payload}
        status, data = _lambda_call(config, "POST", f"{_function_path(args.name)}/aliases", create)
    else:
        status, data = _lambda_call(config, "PUT", path, payload)
    if status >= 400:
        return 1
    _print_alias(data, args.json)
    return 0


def _print_alias(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    weights = data.get("RoutingConfig", {}).get("AdditionalVersionWeights", {})
    canary = "".join(f", {share:g} to version {v}" for v, share in weights.items())
    print(f"{data['AliasArn']} -> version {data['FunctionVersion']}{canary}")


def cmd_rollback(config: Config, args: argparse.Namespace) -> int:
    name, alias = (urllib.parse.quote(x, safe="") for x in (args.name, args.alias))
    status, data = _lambda_call(config, "POST", f"/v1/functions/{name}/aliases/{alias}/rollback")
    if status >= 400:
        return 1
    _print_alias(data, args.json)
    return 0


def cmd_history(config: Config, args: argparse.Namespace) -> int:
    name = urllib.parse.quote(args.name, safe="")
    status, data = _lambda_call(config, "GET", f"/v1/functions/{name}/history?limit={args.limit}")
    if status >= 400:
        return 1
    if args.json:
        print(json.dumps(data["history"], indent=2))
        return 0
    _print_table(data["history"], ["at", "action", "version", "alias", "previous", "actor"])
    return 0


def _post_json(config: Config, path: str, payload: dict[str, Any]) -> Any:
    """The JSON answer, or None once the daemon's refusal is printed."""
    headers = {"Content-Type": "application/json"}
    status, _, body = _request(config, "POST", path, json.dumps(payload).encode(), headers)
    data = json.loads(body or b"{}")
    if status >= 400:
        print(f"lambdaemon: {data.get('error') or data.get('message') or status}", file=sys.stderr)
        return None
    return data


def _print_table(
    rows: list[dict[str, Any]], columns: list[str], extra: Any = None, *, header: bool = True
) -> None:
    table = []
    for row in rows:
        merged = {**row, **(extra(row) if extra else {})}
        table.append([_cell(merged.get(c)) for c in columns + (["triggers"] if extra else [])])
    heads = [c.upper() for c in columns + (["triggers"] if extra else [])]
    widths = [
        max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(heads)
    ]
    if header:
        print("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip())
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
