"""The PostgreSQL store's connection: what `lambdaemon check` asks of the server named by
[store] url, and how a refusal is told apart from a server that cannot be reached.

Only the connection exists so far; the store itself still runs on SQLite alone and the daemon
refuses to start with a [store] url (docs/store.md says what is built and what is not).

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


def probe(config: Config) -> str:
    """Connect as [store] says and return the server's version ("16.4").

    ConfigError when the URL does not parse or the server refuses the user, password or
    database (the message says which); StoreUnavailableError when no server answers.
    """
    params = store_connection(config)
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            config.path,
            "store.url",
            "a PostgreSQL store needs psycopg 3: pip install 'lambdaemon[postgresql]'",
        ) from None
    where = f"{params['user']}@{params['host']}:{params['port']}/{params['dbname']}"
    try:
        with psycopg.connect(**params, autocommit=True) as conn:  # type: ignore[arg-type]
            return str(conn.info.parameter_status("server_version") or "?").split()[0]
    except psycopg.OperationalError as exc:
        message = " ".join(str(exc).split())
        if any(part in message for part in _REFUSED):
            key = "store.password_file" if "password" in message else "store.url"
            raise ConfigError(config.path, key, f"the server refused {where}: {message}") from None
        raise StoreUnavailableError(f"store.url: cannot reach {where}: {message}") from None
