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
from urllib.parse import urlsplit

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
