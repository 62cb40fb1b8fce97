"""The PostgreSQL store's connection: what `lambdaemon check` asks of the server named by
[store] url, and how a refusal is told apart from a server that cannot be reached (for `check`
and for `run`'s start). The store itself is daemon/store/pgstore.py.

psycopg 3, not asyncpg: the store's writes are plain functions that one database thread runs
on a DB-API connection (daemon/store/batches.py). psycopg 3's synchronous connection is such a
connection, with pipeline mode for group commit, so the same functions can run on it in the
same thread; asyncpg offers neither a DB-API connection nor a synchronous one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.credentials import store_connection
from daemon.errors import ConfigError, StoreUnavailableError

if TYPE_CHECKING:
    from types import ModuleType

    from daemon.config import Config

# Parts of libpq's and the server's messages that mean the server answered and said no to these
# credentials (SQLSTATE class 28, which libpq does not hand over for a failed connection).
_REFUSED = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "pg_hba.conf rejects",
    "peer authentication",
    "does not exist",  # role "x" / database "x"
)


def require_psycopg(config: Config) -> ModuleType:
    """psycopg 3, or a ConfigError under store.url that says how to install it."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            config.path,
            "store.url",
            "a PostgreSQL store needs psycopg 3: pip install 'lambdaemon[postgresql]'",
        ) from None
    return psycopg


def probe(config: Config) -> str:
    """Connect as [store] says and return the server's version ("16.4").

    ConfigError when the URL does not parse or the server refuses the user, password or
    database (the message says which); StoreUnavailableError when no server answers.
    """
    params = store_connection(config)
    psycopg = require_psycopg(config)
    where = describe(params)
    try:
        with psycopg.connect(**params, autocommit=True) as conn:
            return str(conn.info.parameter_status("server_version") or "?").split()[0]
    except psycopg.OperationalError as exc:
        raise refusal(config, where, exc) from None


def describe(params: dict[str, str]) -> str:
    """user@host:port/dbname: how messages name the database (never with the password)."""
    return f"{params['user']}@{params['host']}:{params['port']}/{params['dbname']}"


def refusal(config: Config, where: str, exc: BaseException) -> Exception:
    """What a failed connection means: a ConfigError when the server refused these credentials
    or this database, else StoreUnavailableError (no server answered)."""
    message = " ".join(str(exc).split())
    if any(part in message for part in _REFUSED):
        key = "store.password_file" if "password" in message else "store.url"
        return ConfigError(config.path, key, f"the server refused {where}: {message}")
    return StoreUnavailableError(f"store.url: cannot reach {where}: {message}")
