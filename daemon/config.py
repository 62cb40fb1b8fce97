"""TOML configuration -> frozen, typed settings.

Every error is a ConfigError naming the file, the key path (``functions.hello.timeout_s``) and
the reason. Relative paths are resolved against the folder of the config file. A trigger table
becomes the settings of the kind its `type` names (triggers/registry.py), which checks itself.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import ipaddress
import os
import re
import shutil
import socket
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from daemon.bubblewrap import SANDBOX_GID, SANDBOX_UID, unavailable
from daemon.credentials import mqtt_connection, read_secret, store_connection
from daemon.errors import ConfigError
from triggers import registry
from triggers.base import TriggerSettings

DEFAULT_CONFIG = Path("config/example.toml")
_DAEMON_PACKAGE = Path(__file__).resolve().parent
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# module.function, the module dotted or (as the AWS Python runtime also takes) slashed: src/app.fn
HANDLER = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*([./][A-Za-z_][A-Za-z0-9_]*)*\.[A-Za-z_][A-Za-z0-9_]*$"
)
# The platform sets these in every worker; a function's env may not override them.
RESERVED_ENV = frozenset(
    {
        "_HANDLER",
        "LAMBDA_TASK_ROOT",
        "LAMBDA_RUNTIME_DIR",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_EXECUTION_ENV",
        "NOTIFY_SOCKET",
    }
)

NonNegative = Annotated[float, Meta(ge=0)]
# A node id: letters, digits, `.`, `_`, `-`; what host names are made of.
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Retry delays: above zero, at most a day (a longer wait is better served by a redrive).
BackoffSeconds = Annotated[float, Meta(gt=0, le=86_400)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonSettings(_Section, frozen=True):
    data_dir: str = "var"
    functions_dir: str = "../functions"
    max_workers: Annotated[int, Meta(ge=1, le=1024)] = 4
    shutdown_timeout_s: NonNegative = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    region: Annotated[str, Meta(pattern=r"^[a-z0-9-]{1,32}$")] = "us-east-1"
    log_capture_bytes: Annotated[int, Meta(ge=1024, le=8 * 1024 * 1024)] = 64 * 1024
    # Final records (with their logs, attempts and dead letters) older than this are pruned;
    # 0 keeps them until max_db_mb needs the room. Queued and running rows are never pruned.
    retention_days: Annotated[float, Meta(ge=0, le=36_500)] = 30.0
    # The database file plus its WAL; the oldest final records go first when it is reached.
    max_db_mb: Annotated[int, Meta(ge=1, le=1024 * 1024)] = 256
    # auto: uvloop when it is installed (a dependency on x86_64 and aarch64), else asyncio's.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # A folder of wheels: a deployed requirements.txt is installed from it alone (pip
    # --no-index), so deploys work offline. Unset: pip uses its own configuration (the index).
    wheelhouse: str | None = None
    # Published versions kept per function beyond those an alias or a queued invocation needs.
    keep_versions: Annotated[int, Meta(ge=1, le=10_000)] = 10
    # What `lambdaemon usage` prices the work at, in US dollars: AWS Lambda's published x86
    # prices in us-east-1 as published in 2024-2025 (docs/reference.md), per request and per
    # GB-second.
    price_per_request: NonNegative = 0.0000002
    price_per_gb_second: NonNegative = 0.0000166667
    # Every function's workers in bubblewrap unless its own `sandbox` says otherwise. auto: on
    # when this host can run one (bwrap installed, its namespaces allowed), else off, and the
    # start, `check` and /health say why (daemon/bubblewrap.py, daemon/pool/sandbox.py).
    sandbox: bool | Literal["auto"] = "auto"
    # This daemon's name in a fleet sharing one PostgreSQL store (docs/store.md): the node its
    # invocations and attempts are recorded under. Unset: the host name. Two daemons on one
    # database never share one.
    node_id: Annotated[str, Meta(pattern=NODE_ID_PATTERN)] | None = None


class ListenerSettings(_Section, frozen=True):
    """What one HTTP listener allows a client (daemon/http/wire.py enforces it)."""

    head_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0  # connect or idle → whole head
    body_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0  # head → whole body; answer taken
    keepalive_s: Annotated[float, Meta(gt=0, le=3600)] = 75.0  # idle between requests
    max_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024
    max_pipelined: Annotated[int, Meta(ge=1, le=1024)] = 16  # parsed, unanswered, per connection


class ApiSettings(ListenerSettings, frozen=True):
    listen: str = "127.0.0.1:9070"
    token_file: str | None = None


class MqttSettings(_Section, frozen=True):
    url: str = "mqtt://127.0.0.1:1883"
    # Unset (""; a set one is never empty): "lambdaemon", or with share_group one per node,
    # "lambdaemon-<node id>" (_validate): it names the broker session, which no two may share.
    client_id: Annotated[str, Meta(min_length=1, max_length=128)] = ""
    # Every mqtt trigger subscribes as $share/<share_group>/<topic>: the nodes of a fleet with
    # the same group split the messages (triggers/mqtt.py).
    share_group: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Meta(ge=0)] = 7 * 24 * 3600


class StoreSettings(_Section, frozen=True):
    """Where the store lives. Without `url`, the SQLite file in data_dir (the default)."""

    # postgresql://USER@HOST[:PORT]/DBNAME[?sslmode=...]; the password never in the URL.
    url: str | None = None
    password_file: str | None = None  # a file, or credential:NAME (systemd LoadCredential=)
    connect_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 5.0
    # A node's lease on its work in a fleet (docs/store.md): renewed every third of it; a node
    # that has not renewed it for this long is dead and others take its work over.
    lease_s: Annotated[float, Meta(ge=1, le=600)] = 10.0


class WebhookSettings(ListenerSettings, frozen=True):
    listen: str = "0.0.0.0:8080"
    max_body_bytes: Annotated[int, Meta(ge=1, le=64 * 1024 * 1024)] = 6 * 1024 * 1024


class FunctionConfig(_Section, frozen=True):
    """One function: where its code is and how it runs. `name` and `code` are filled in."""

    handler: str
    code: str | None = None
    # python: the in-process worker (worker.py); provided: the code folder's executable
    # `bootstrap` on Lambda's Runtime API; nodejs: lambdaemon's Node.js bootstrap (runtime.py).
    runtime: str = "python"
    timeout_s: Annotated[float, Meta(gt=0, le=900)] = 3.0
    memory_mb: Annotated[int, Meta(ge=16, le=10240)] = 128
    concurrency: Annotated[int, Meta(ge=1, le=1024)] = 1
    queue_size: Annotated[int, Meta(ge=0, le=100_000)] = 100
    idle_timeout_s: NonNegative = 300.0
    min_warm: Annotated[int, Meta(ge=0)] = 0
    # A worker is replaced between invocations (never during one) after serving this many
    # (0: never), or once its resident memory after a call reaches max_worker_rss_mb (0: off;
    # memory_mb's address-space limit bounds every worker regardless).
    max_invocations_per_worker: Annotated[int, Meta(ge=0)] = 0
    max_worker_rss_mb: Annotated[int, Meta(ge=0, le=10240)] = 0
    # Async invocations only. Lambda allows 0..2 retries and 60 s..6 h of age; a board that is
    # offline for days needs more room, and tests need ages of a second.
    retries: Annotated[int, Meta(ge=0, le=10)] = 2
    retry_backoff_s: tuple[BackoffSeconds, BackoffSeconds] = (1.0, 60.0)  # first delay, cap
    max_event_age_s: Annotated[float, Meta(ge=1, le=7 * 86_400)] = 21_600.0
    # Where an async invocation's final outcome goes: function:NAME | mqtt:TOPIC | webhook:URL.
    on_success: str | None = None
    on_failure: str | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    # Each table converted into its kind's settings class (triggers/registry.py).
    triggers: list[TriggerSettings] = msgspec.field(default_factory=list)
    name: str = ""
    version: str = "$LATEST"
    region: str = "us-east-1"
    deps: str | None = None  # the folder of its requirements (packages.build_environment)
    # Its workers in bubblewrap (daemon/pool/sandbox.py); unset: [daemon] sandbox's choice.
    sandbox: bool | None = None
    network: bool = True  # false: in the sandbox, a network namespace of its own (loopback)
    tmp_mb: Annotated[int, Meta(ge=1, le=10240)] = 512  # the sandbox's /tmp (Lambda's default)
    # Host folders (or files) the sandbox shows at their own path, read-only or writable;
    # relative to the config's folder. Checked by _mount_problem; resolved when loaded.
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    # Filled in for the sandbox: host paths it must not show (the config folder, data_dir,
    # secrets) and those it shows read-only besides the code (file-drop trigger folders).
    hidden: tuple[str, ...] = ()
    visible: tuple[str, ...] = ()

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:000000000000:function:{self.name}"

    @property
    def log_group(self) -> str:
        return f"/aws/lambda/{self.name}"


class Config(_Section, frozen=True):
    daemon: DaemonSettings = DaemonSettings()
    api: ApiSettings = ApiSettings()
    mqtt: MqttSettings | None = None
    store: StoreSettings = StoreSettings()
    webhooks: WebhookSettings | None = None
    functions: dict[str, FunctionConfig] = msgspec.field(default_factory=dict)
    path: str = ""  # the file this came from

    @property
    def base_dir(self) -> Path:
        return Path(self.path).parent

    def resolve(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return (self.base_dir / value).resolve()

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.daemon.data_dir)

    @property
    def node_id(self) -> str:
        """[daemon] node_id, else this host's name (checked by load_config)."""
        return self.daemon.node_id or socket.gethostname()

    @property
    def wheelhouse_dir(self) -> Path | None:
        return None if self.daemon.wheelhouse is None else self.resolve(self.daemon.wheelhouse)


# FunctionConfig's fields the daemon fills in; a function table may not set them.
_FILLED_IN = ("name", "region", "version", "deps", "hidden", "visible")

# --- loading -----------------------------------------------------------------------------------


def config_path(cli_value: str | None) -> Path:
    """--config, else $LAMBDAEMON_CONFIG, else config/example.toml."""
    return Path(cli_value or os.environ.get("LAMBDAEMON_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, type-check and validate a config file; raise ConfigError on any problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    raw_functions = raw.pop("functions", {})
    if not isinstance(raw_functions, dict):
        raise ConfigError(path, "functions", "must be a table of [functions.NAME] tables")
    config = _convert(raw, Config, path, "")
    functions = {}
    for name, fn in raw_functions.items():
        if isinstance(fn, dict) and (bad := next((k for k in _FILLED_IN if k in fn), None)):
            raise ConfigError(path, f"functions.{name}.{bad}", "unknown key")
        functions[name] = _convert_function(fn, path, f"functions.{name}")
    config = msgspec.structs.replace(config, path=str(path.resolve()), functions=functions)
    return _validate(config)


def _convert_function(raw: object, path: Path, key: str) -> FunctionConfig:
    tables = raw.pop("triggers", []) if isinstance(raw, dict) else []
    fn: FunctionConfig = _convert(raw, FunctionConfig, path, key)
    tables = _convert(tables, list[dict[str, Any]], path, f"{key}.triggers")
    triggers = [_convert_trigger(t, path, f"{key}.triggers[{i}]") for i, t in enumerate(tables)]
    return msgspec.structs.replace(fn, triggers=triggers)


def _convert_trigger(table: dict[str, Any], path: Path, key: str) -> TriggerSettings:
    """A trigger table as the settings of the kind its `type` names."""
    if "type" not in table:
        raise ConfigError(path, f"{key}.type", "required key is missing")
    kind = _convert(table["type"], str, path, f"{key}.type")
    if kind not in registry.KINDS:
        choices = ", ".join(registry.KINDS)
        raise ConfigError(path, f"{key}.type", f"unknown type {kind!r} (one of: {choices})")
    settings: TriggerSettings = _convert(table, registry.kind(kind).settings, path, key)
    return settings


def _convert(raw: object, kind: Any, path: Path, prefix: str) -> Any:
    if isinstance(raw, dict) and isinstance(raw.get("env"), dict):
        for env_key, value in raw["env"].items():  # msgspec would say env[...]; name the key
            if not isinstance(value, str):
                raise ConfigError(
                    path, f"{prefix}.env.{env_key}", f"must be a string, got {value!r}"
                )
    try:
        return msgspec.convert(raw, kind, str_keys=True)
    except msgspec.ValidationError as exc:
        key, reason = _split_msgspec_error(str(exc))
        if key.endswith("type") and reason.startswith("Invalid value"):  # a tagged union's
            choices = ", ".join(_tags(kind, key))
            reason = f"unknown type {reason.removeprefix('Invalid value ')} (one of: {choices})"
        if prefix and key:
            key = f"{prefix}{'' if key.startswith('[') else '.'}{key}"
        raise ConfigError(path, key or prefix, reason) from None


def _tags(kind: Any, key: str) -> list[str]:
    """The `type` values the tagged union at `key` (`auth.type`) of `kind` accepts."""
    info = msgspec.inspect.type_info(kind)
    for name in re.sub(r"\[\d+\]", "", key).split(".")[:-1]:
        while isinstance(info, msgspec.inspect.ListType | msgspec.inspect.DictType):
            info = info.item_type if isinstance(info, msgspec.inspect.ListType) else info.value_type
        if isinstance(info, msgspec.inspect.StructType):
            info = next(f.type for f in info.fields if f.encode_name == name)
    types = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return [str(t.tag) for t in types if isinstance(t, msgspec.inspect.StructType)]


def _split_msgspec_error(message: str) -> tuple[str, str]:
    reason, _, where = message.partition(" - at `$")
    key = where.rstrip("`").lstrip(".")
    unknown = re.match(r"Object contains unknown field `(.+)`", reason)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        reason = "unknown key"
    missing = re.match(r"Object missing required field `(.+)`", reason)
    if missing:
        key = f"{key}.{missing.group(1)}" if key else missing.group(1)
        reason = "required key is missing"
    return key, reason


def _validate(config: Config) -> Config:
    path = config.path
    listen_host(config.api.listen, path, "api.listen")
    if config.daemon.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError(path, "daemon.event_loop", "uvloop is not installed (pip install uvloop)")
    if not is_loopback(config.api.listen):
        if config.api.token_file is None:
            raise ConfigError(
                path, "api.token_file", "required when api.listen is not a loopback address"
            )
    if config.api.token_file is not None:
        read_secret(config, config.api.token_file, "api.token_file")
    wheelhouse = config.wheelhouse_dir
    if wheelhouse is not None and not wheelhouse.is_dir():
        raise ConfigError(path, "daemon.wheelhouse", f"folder {wheelhouse} does not exist")
    if config.webhooks is not None:
        listen_host(config.webhooks.listen, path, "webhooks.listen")
    if config.store.url is not None:
        store_connection(config)
    elif config.store.password_file is not None:
        raise ConfigError(path, "store.password_file", "needs store.url (a PostgreSQL store)")
    if config.daemon.node_id is None and not re.match(NODE_ID_PATTERN, config.node_id):
        raise ConfigError(
            path,
            "daemon.node_id",
            f"the host name {config.node_id!r} is not a node id (letters, digits, '.', '_',"
            " '-', at most 63): set node_id",
        )
    if config.mqtt is not None:
        mqtt_connection(config)
        config = msgspec.structs.replace(config, mqtt=_mqtt(config, config.mqtt))
    functions_dir = config.resolve(config.daemon.functions_dir)
    functions = {}
    for name, fn in config.functions.items():
        functions[name] = _validate_function(config, name, fn, functions_dir)
    for kind, triggers in registry.triggers_by_kind(config).items():
        registry.kind(kind).settings.check_all(config, triggers)
    return msgspec.structs.replace(config, functions=functions)


def _mqtt(config: Config, mqtt: MqttSettings) -> MqttSettings:
    """The share group checked, and the client id filled in when unset."""
    group = mqtt.share_group
    if group is not None and (bad := next((c for c in "/+#\0" if c in group), None)):
        reason = f"{group!r} may not contain {bad!r}: it is one level of $share/<group>/<topic>"
        raise ConfigError(config.path, "mqtt.share_group", reason)
    if mqtt.client_id:
        return mqtt
    # Each node of a share group needs a session of its own: its node id (the host name
    # unless set) tells them apart where every node runs the same config.
    client_id = f"lambdaemon-{config.node_id}" if group is not None else "lambdaemon"
    return msgspec.structs.replace(mqtt, client_id=client_id)


def _validate_function(
    config: Config, name: str, fn: FunctionConfig, functions_dir: Path
) -> FunctionConfig:
    path, key = config.path, f"functions.{name}"
    if not FUNCTION_NAME.match(name):
        raise ConfigError(path, key, "function names are 1-64 letters, digits, '-' or '_'")
    code = config.resolve(fn.code) if fn.code else functions_dir / name
    if not code.is_dir():
        what = f"{key}.code" if fn.code else key
        raise ConfigError(path, what, f"code folder {code} does not exist")
    if fn.runtime not in RUNTIMES:
        choices = ", ".join(RUNTIMES)
        raise ConfigError(
            path, f"{key}.runtime", f"unknown runtime {fn.runtime!r} (one of: {choices})"
        )
    if fn.runtime == "python":
        check_handler(code, fn.handler, path, f"{key}.handler")
    elif fn.runtime == "provided":
        check_bootstrap(code, path, f"{key}.runtime")
    else:
        check_node_handler(code, fn.handler, path, f"{key}.handler")
    if fn.min_warm > fn.concurrency:
        raise ConfigError(
            path, f"{key}.min_warm", f"{fn.min_warm} is more than concurrency = {fn.concurrency}"
        )
    if fn.min_warm > config.daemon.max_workers:
        raise ConfigError(path, f"{key}.min_warm", f"{fn.min_warm} is more than daemon.max_workers")
    if fn.max_worker_rss_mb > fn.memory_mb:
        raise ConfigError(
            path,
            f"{key}.max_worker_rss_mb",
            f"{fn.max_worker_rss_mb} is more than "
            f"memory_mb = {fn.memory_mb}: the memory limit stops the worker first",
        )
    first_s, cap_s = fn.retry_backoff_s
    if first_s > cap_s:
        raise ConfigError(
            path,
            f"{key}.retry_backoff_s",
            f"the first delay ({first_s:g} s) is more than the cap ({cap_s:g} s)",
        )
    for env_key in fn.env:
        if env_key in RESERVED_ENV or env_key.startswith("AWS_LAMBDA_"):
            raise ConfigError(
                path, f"{key}.env.{env_key}", "reserved by the runtime; choose another name"
            )
        if not env_key or "=" in env_key or "\0" in env_key:
            raise ConfigError(path, f"{key}.env.{env_key}", "not a valid environment variable name")
    for i, trigger in enumerate(fn.triggers):
        trigger.check(config, f"{key}.triggers[{i}]")
        if trigger.qualifier is not None and (problem := qualifier_problem(trigger.qualifier)):
            raise ConfigError(path, f"{key}.triggers[{i}].qualifier", problem)
        for field, value in trigger.secret_files().items():
            read_secret(config, value, f"{key}.triggers[{i}].{field}")
    for field in ("on_success", "on_failure"):
        if (destination := getattr(fn, field)) is not None:
            _validate_destination(config, destination, f"{key}.{field}")
    sandbox = _sandbox_choice(config, fn, key)
    return msgspec.structs.replace(
        fn,
        name=name,
        code=str(code),
        region=config.daemon.region,
        sandbox=sandbox,
        read_paths=_mounts(config, fn, key, "read_paths", functions_dir, sandbox),
        write_paths=_mounts(config, fn, key, "write_paths", functions_dir, sandbox),
        hidden=_private_paths(config, functions_dir) if sandbox else (),
        visible=tuple(
            str(config.resolve(folder))
            for t in fn.triggers
            if sandbox and isinstance(folder := getattr(t, "path", None), str)
        ),
    )


def _sandbox_choice(config: Config, fn: FunctionConfig, key: str) -> bool:
    """Whether `fn` runs sandboxed; a ConfigError when it must and cannot."""
    wanted: bool | Literal["auto"] = config.daemon.sandbox
    where = "daemon.sandbox"
    if fn.sandbox is not None:
        wanted, where = fn.sandbox, f"{key}.sandbox"
    if wanted is False:
        return False
    if wanted == "auto":
        return unavailable() is None
    if (why := unavailable()) is not None:
        raise ConfigError(
            config.path,
            where,
            f"function {fn.name or key.split('.', 1)[1]} needs a sandbox, and {why}",
        )
    return True


def _private_paths(config: Config, functions_dir: Path) -> tuple[str, ...]:
    """What a sandbox must not show, wherever it lies: the config folder, data_dir, the
    functions folder (other functions' code) and every secret file the config names."""
    paths = {str(config.base_dir), str(config.data_dir), str(functions_dir)}
    return tuple(sorted(paths | {str(secret) for secret in _secret_paths(config)}))


def _secret_paths(config: Config) -> list[Path]:
    """Every file holding a secret the config names (not those systemd passes: credential:)."""
    secrets = [config.api.token_file, config.store.password_file]
    if config.mqtt is not None:
        secrets += [config.mqtt.password_file, config.mqtt.ca_file]
    for fn in config.functions.values():
        for trigger in fn.triggers:
            secrets += list(trigger.secret_files().values())
    return [
        config.resolve(secret)
        for secret in secrets
        if secret is not None and not secret.startswith("credential:")
    ]


# What the daemon keeps in data_dir: the SQLite database (and its -wal, -shm, -journal),
# deployed code, deployed dependencies, and their folders while they are being built.
DB_FILE = "lambdaemon.db"
_DATA_DIR_OWN = (DB_FILE, "code", "envs", ".tmp-")


def _mounts(
    config: Config, fn: FunctionConfig, key: str, field: str, functions_dir: Path, sandbox: bool
) -> tuple[str, ...]:
    """`fn`'s read_paths or write_paths, resolved and checked (_mount_problem)."""
    fn_name, resolved = key.split(".", 1)[1], []
    for i, value in enumerate(getattr(fn, field)):
        where = f"{key}.{field}[{i}]"
        if not value or "\0" in value:
            raise ConfigError(config.path, where, "must be a path")
        path = config.resolve(value)
        if field == "read_paths" and not path.exists():
            raise ConfigError(config.path, where, f"{path} does not exist")
        if (problem := _mount_problem(config, fn_name, path, field, functions_dir)) is not None:
            raise ConfigError(config.path, where, f"{path} {problem}")
        if field == "write_paths" and path.exists():
            if not path.is_dir():
                raise ConfigError(config.path, where, f"{path} is not a folder")
            if sandbox and os.geteuid() == 0 and not _nobody_may_write(path):
                raise ConfigError(
                    config.path,
                    where,
                    f"{path} is not writable by uid {SANDBOX_UID}, whom a root daemon's sandboxed"
                    f" workers run as (chown {SANDBOX_UID}:{SANDBOX_GID} it, or chmod o+wx it)",
                )
        resolved.append(str(path))
    return tuple(resolved)


def _nobody_may_write(folder: Path) -> bool:
    """Whether SANDBOX_UID (no groups but its own) may create files in `folder`, by its mode;
    a folder with an ACL is given the benefit of the doubt."""
    with contextlib.suppress(OSError):
        if os.getxattr(folder, "system.posix_acl_access"):
            return True
    st = folder.stat()
    if st.st_uid == SANDBOX_UID:
        return st.st_mode & 0o300 == 0o300
    if st.st_gid == SANDBOX_GID:
        return st.st_mode & 0o030 == 0o030
    return st.st_mode & 0o003 == 0o003


def _mount_problem(
    config: Config, name: str, path: Path, field: str, functions_dir: Path
) -> str | None:
    """Why a sandbox may not show `path` (a read_paths or write_paths entry), or None: it would
    show what the sandbox hides (the config and its secrets, the database, other functions'
    code), or, writable, let a function change the daemon's own code."""
    data_dir, config_dir = config.data_dir, config.base_dir
    private = [
        (data_dir, "data_dir (the database and deployed code)"),
        (config_dir, "the config's folder (the config and its secrets)"),
        (functions_dir, "the functions folder (every function's code)"),
        (Path(config.path), "the config file"),
        *((secret, "a secret file the config names") for secret in _secret_paths(config)),
        *(
            (
                config.resolve(other.code) if other.code else functions_dir / other_name,
                f"function {other_name}'s code",
            )
            for other_name, other in config.functions.items()
            if other_name != name
        ),
    ]
    for hidden, what in private:
        if hidden.is_relative_to(path):
            return f"would show {what}: {hidden}"
    if path.is_relative_to(data_dir):
        first = path.relative_to(data_dir).parts[0]
        if any(first.startswith(own) for own in _DATA_DIR_OWN):
            return f"is the daemon's own in data_dir ({first}): the database and deployed code"
    if field == "write_paths":
        for own in (Path(sys.prefix), Path(sys.base_prefix), _DAEMON_PACKAGE):
            if own.is_relative_to(path) or path.is_relative_to(own):
                return f"would let the function change the daemon's installation ({own})"
    return None


# A function's qualifiers (daemon/versions.py): a published version's number, an alias's name.
# ASCII digits and \Z: `\d` takes any script's digits and `$` a trailing newline, and "1\n"
# would be stored as a version an alias names while version 1 could still be deleted under it.
VERSION_NUMBER = re.compile(r"^[1-9][0-9]{0,9}\Z")
ALIAS_NAME = re.compile(r"^(?![0-9]+\Z)[A-Za-z0-9_-]{1,128}\Z")


def qualifier_problem(qualifier: str) -> str | None:
    """Why `qualifier` is not `$LATEST`, a version number or an alias name, or None."""
    if qualifier == "$LATEST" or VERSION_NUMBER.match(qualifier) or ALIAS_NAME.match(qualifier):
        return None
    return f"{qualifier!r} is not $LATEST, a version number or an alias name"


DESTINATION_KINDS = ("function", "mqtt", "webhook")


def parse_destination(value: str) -> tuple[str, str]:
    """`function:NAME`, `mqtt:TOPIC` or `webhook:URL` -> (kind, target); ValueError if not."""
    kind, sep, target = value.partition(":")
    if not sep or kind not in DESTINATION_KINDS or not target:
        raise ValueError(f"{value!r} is not function:NAME, mqtt:TOPIC or webhook:URL")
    return kind, target


def _validate_destination(config: Config, value: str, key: str) -> None:
    path = config.path
    try:
        kind, target = parse_destination(value)
    except ValueError as exc:
        raise ConfigError(path, key, str(exc)) from None
    if kind == "function" and target not in config.functions:
        raise ConfigError(path, key, f"no function {target!r} is configured")
    if kind == "mqtt":
        if config.mqtt is None:
            raise ConfigError(path, key, "an mqtt: destination needs an [mqtt] section")
        if any(c in target for c in "+#\0") or len(target.encode()) > 65535:
            raise ConfigError(path, key, f"{target!r} is not an MQTT topic to publish to")
    if kind == "webhook":
        parts = urlsplit(target)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            raise ConfigError(path, key, f"{target!r} has an invalid port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(path, key, f"{target!r} is not an http:// or https:// URL")


RUNTIMES = ("python", "provided", "nodejs")
NODE_EXTENSIONS = (".js", ".mjs", ".cjs")


def check_bootstrap(code: Path, path: str, key: str) -> None:
    """A `provided` function's code folder holds an executable file named `bootstrap`."""
    bootstrap = code / "bootstrap"
    if not bootstrap.is_file():
        raise ConfigError(path, key, f"runtime 'provided' needs an executable {bootstrap}: missing")
    if not os.access(bootstrap, os.X_OK):
        raise ConfigError(
            path, key, f"runtime 'provided' needs an executable {bootstrap}: not executable"
        )


def node_binary() -> str | None:
    """Node.js as Debian installs it (`node`, or `nodejs` on older releases), or None."""
    return shutil.which("node") or shutil.which("nodejs")


def check_node_handler(code: Path, handler: str, path: str, key: str) -> None:
    """Node.js is installed and `handler` names file.function of a module in `code`."""
    if node_binary() is None:
        raise ConfigError(
            path,
            key.rpartition(".")[0] + ".runtime",
            "runtime 'nodejs' needs Node.js: no `node` on PATH (on Debian: apt-get install nodejs)",
        )
    if not HANDLER.match(handler):
        raise ConfigError(path, key, f"{handler!r} is not of the form file.function")
    module = handler.rpartition(".")[0]
    if not any(code.joinpath(module + ext).is_file() for ext in NODE_EXTENSIONS):
        names = " or ".join(module + ext for ext in NODE_EXTENSIONS)
        raise ConfigError(path, key, f"module {names} not found in {code}")


def check_handler(code: Path, handler: str, path: str, key: str) -> None:
    """The handler's module exists in `code` and defines the attribute; no user code runs."""
    if not HANDLER.match(handler):
        raise ConfigError(path, key, f"{handler!r} is not of the form module.function")
    module, _, attr = handler.rpartition(".")
    base = code.joinpath(*module.replace("/", ".").split("."))
    source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not source.is_file():
        raise ConfigError(path, key, f"module {module!r} not found in {code}")
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except SyntaxError as exc:
        raise ConfigError(path, key, f"{source}:{exc.lineno}: syntax error: {exc.msg}") from None
    if not _defines(tree, attr):
        raise ConfigError(path, key, f"{source} defines no {attr!r}")


def _defines(tree: ast.Module, attr: str) -> bool:
    for node in tree.body:
        if (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.name == attr
        ):
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                return True
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name.split(".")[0]) == attr:
                    return True
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return True
        if isinstance(node, ast.If | ast.Try):  # conditional definitions: be lenient
            body = [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
            inner = ast.Module(body=body, type_ignores=[])
            if _defines(inner, attr):
                return True
    return False


def listen_host(listen: str, path: str, key: str) -> tuple[str, int]:
    """Split `host:port` (or `[v6]:port`); raise ConfigError when it is not one."""
    match = re.match(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$", listen)
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(path, key, f"{listen!r} is not host:port")
    return match["v6"] or match["host"], int(match["port"])


def is_loopback(listen: str) -> bool:
    host, _ = listen_host(listen, "", "")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
