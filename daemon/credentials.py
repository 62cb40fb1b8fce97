"""What a config names that is read from disk when a part is built: secrets and TLS trust.

A secret is a file path (relative to the config file's folder) or `credential:NAME`, read from
$CREDENTIALS_DIRECTORY/NAME (systemd's LoadCredential=). The [mqtt] connection (address, TLS
context, password) is read here too, for the MQTT trigger and the daemon's own publisher alike.
Every problem is a ConfigError naming the key.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

from daemon.errors import ConfigError

if TYPE_CHECKING:
    from daemon.config import Config


def read_secret(config: Config, value: str, key: str) -> str:
    """A secret file's stripped content; `credential:NAME` reads $CREDENTIALS_DIRECTORY/NAME."""
    if value.startswith("credential:"):
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                config.path,
                key,
                f"{value!r} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)",
            )
        file = Path(directory) / value.removeprefix("credential:")
    else:
        file = config.resolve(value)
    try:
        secret = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(config.path, key, f"cannot read {file}: {exc.strerror or exc}") from None
    if not secret:
        raise ConfigError(config.path, key, f"{file} is empty")
    return secret


def mqtt_connection(config: Config) -> tuple[str, int, ssl.SSLContext | None, str | None]:
    """(host, port, TLS context, password) from the [mqtt] section; ConfigError if invalid."""
    assert config.mqtt is not None
    settings = config.mqtt
    host, port, tls = _parse_url(config, settings.url, settings.ca_file)
    password = None
    if settings.password_file:
        password = read_secret(config, settings.password_file, "mqtt.password_file")
    return host, port, tls, password


def _parse_url(
    config: Config, url: str, ca_file: str | None
) -> tuple[str, int, ssl.SSLContext | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port == -1:
        reason = f"{url!r} is not mqtt://host[:port] or mqtts://host[:port]"
        raise ConfigError(config.path, "mqtt.url", reason)
    if parts.scheme == "mqtt":
        if ca_file is not None:
            raise ConfigError(config.path, "mqtt.ca_file", "needs an mqtts:// url")
        return parts.hostname, port or 1883, None
    try:
        context = ssl.create_default_context(
            cafile=str(config.resolve(ca_file)) if ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(config.path, "mqtt.ca_file", f"cannot load {ca_file}: {exc}") from None
    return parts.hostname, port or 8883, context


# The libpq parameters a [store] url may carry after `?` (anything else is refused by name).
STORE_URL_PARAMETERS = frozenset(
    {"sslmode", "sslrootcert", "sslcert", "sslkey", "application_name", "target_session_attrs"}
)
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def store_connection(config: Config) -> dict[str, str]:
    """libpq keyword parameters for [store] url (+ password_file); ConfigError if invalid.

    Parsed here, not by libpq, so that a URL that does not parse is told apart (by key and
    reason) from a server that cannot be reached or refuses the credentials.
    """
    settings = config.store
    url = settings.url
    assert url is not None
    shape = "postgresql://USER@HOST[:PORT]/DBNAME[?sslmode=...]"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("postgresql", "postgres") or port == -1:
        raise ConfigError(config.path, "store.url", f"{url!r} is not {shape}")
    if not parts.hostname:
        raise ConfigError(config.path, "store.url", f"{url!r} names no host ({shape})")
    if not parts.username:
        raise ConfigError(config.path, "store.url", f"{url!r} names no user ({shape})")
    if parts.password is not None:
        raise ConfigError(
            config.path,
            "store.url",
            "holds a password; put it in store.password_file (a file or credential:NAME)",
        )
    dbname = unquote(parts.path.removeprefix("/"))
    if not dbname or "/" in dbname:
        raise ConfigError(config.path, "store.url", f"{url!r} names no database ({shape})")
    if parts.fragment:
        raise ConfigError(config.path, "store.url", f"{url!r} has a #fragment")
    params = {
        "host": unquote(parts.hostname),
        "port": str(port or 5432),
        "dbname": dbname,
        "user": unquote(parts.username),
        "connect_timeout": str(max(1, round(settings.connect_timeout_s))),
    }
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in STORE_URL_PARAMETERS:
            known = ", ".join(sorted(STORE_URL_PARAMETERS))
            reason = f"unknown parameter {key!r} in {url!r} (known: {known})"
            raise ConfigError(config.path, "store.url", reason)
        if key == "sslmode" and value not in _SSLMODES:
            reason = f"sslmode={value!r} is not one of {', '.join(_SSLMODES)}"
            raise ConfigError(config.path, "store.url", reason)
        if key in ("sslrootcert", "sslcert", "sslkey"):
            value = str(config.resolve(value))
        params[key] = value
    if settings.password_file is not None:
        params["password"] = read_secret(config, settings.password_file, "store.password_file")
    return params
