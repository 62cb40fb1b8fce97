"""The seam between the store's SQL, written for SQLite, and PostgreSQL.

The store's modules (records.py, settle.py, cron.py, outbox.py, deploys.py, ...) run their SQL
on a DB-API connection in the database thread. PgConnection gives them a psycopg 3 connection
that looks enough like sqlite3's for that: `execute`/`executemany` with SQLite's placeholders,
cursors with `rowcount`, `lastrowid` and `description`, rows readable by index and by name. The
few constructs the two dialects spell differently are rewritten once per statement text
(translate, cached), so the modules keep one text of each statement:

- `?` and `:name` placeholders become `%s` and `%(name)s` (a literal `%` becomes `%%`);
- `INSERT OR REPLACE INTO t (...) ...` becomes `INSERT INTO t (...) ... ON CONFLICT (key) DO
  UPDATE SET` every other column, for the tables in CONFLICT_KEYS;
- `SELECT value FROM json_each(?)` becomes `SELECT jsonb_array_elements_text(CAST(? AS jsonb))`;
- the two-argument scalar `max(a, b)` / `min(a, b)` become `greatest` / `least`;
- `rowid` becomes `seq`, the identity column pg_schema.py gives invocations;
- an INSERT into a table with an identity id gets `RETURNING id`, for `lastrowid`;
- `CAST(x AS INTEGER)` becomes `trunc(x)::integer` (SQLite truncates, PostgreSQL rounds);
- a unary `+column`, SQLite's way of keeping the planner off that column's index, loses its `+`;
- the comment OWNED (`/*owned*/`, after a condition on invocations) becomes `AND` the row's
  node is this session's (`lambdaemon.node`): in a fleet a node writes only the invocations it
  owns (daemon/store/fleet.py); SQLite, with one node, reads it as the comment it is.

The PostgreSQL store (daemon/store/pgstore.py) runs its writer and its reads through it;
tests/store/test_backends.py runs the modules' functions through it against both backends.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from daemon.store.records import OWNED

# The key an INSERT OR REPLACE into each table replaces by (its primary key).
CONFLICT_KEYS = {"attempts": ("invocation_id", "attempt")}
# Tables whose INSERTs report the new row's id (cursor.lastrowid).
IDENTITY_TABLES = frozenset({"outbox", "deploy_history"})

_REPLACE = re.compile(r"^\s*INSERT OR REPLACE INTO (\w+) \(([^)]*)\)", re.IGNORECASE)
_INSERT = re.compile(r"^\s*INSERT INTO (\w+)\b", re.IGNORECASE)
_JSON_EACH = re.compile(r"SELECT value FROM json_each\(\?\)", re.IGNORECASE)
_SCALAR = re.compile(r"\b(max|min)\(([^(),]+),([^(),]+)\)", re.IGNORECASE)
_ROWID = re.compile(r"\browid\b", re.IGNORECASE)
# CAST(expr AS INTEGER), expr holding at most one level of parentheses.
_CAST_INT = re.compile(r"\bCAST\(((?:[^()]|\([^()]*\))*) AS INTEGER\)", re.IGNORECASE)
_UNARY_PLUS = re.compile(r"(?<=[\s(])\+(?=[A-Za-z_])")
_OWNED_PG = " AND node IS NOT DISTINCT FROM current_setting('lambdaemon.node', true)"


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> tuple[str, bool]:
    """(PostgreSQL's text of `sql`, whether it returns the new row's id)."""
    if (m := _REPLACE.match(sql)) is not None:
        table, columns = m.group(1), [c.strip() for c in m.group(2).split(",")]
        key = CONFLICT_KEYS[table]
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)})"
            + sql[m.end() :]
            + f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
        )
    sql = _JSON_EACH.sub("SELECT jsonb_array_elements_text(CAST(? AS jsonb))", sql)
    sql = _SCALAR.sub(
        lambda m: (
            f"{'greatest' if m.group(1).lower() == 'max' else 'least'}({m.group(2)},{m.group(3)})"
        ),
        sql,
    )
    sql = _ROWID.sub("seq", sql)
    sql = _CAST_INT.sub(lambda m: f"trunc({m.group(1)})::integer", sql)
    sql = _UNARY_PLUS.sub("", sql)
    sql = sql.replace(OWNED, _OWNED_PG)
    returns_id = False
    if (m := _INSERT.match(sql)) is not None and m.group(1) in IDENTITY_TABLES:
        if "RETURNING" not in sql.upper():
            sql += " RETURNING id"
            returns_id = True
    return _placeholders(sql), returns_id


def _placeholders(sql: str) -> str:
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "'":  # a string literal, '' inside it included: copied as it is
            j = i + 1
            while j < n:
                if sql[j] == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i : j + 1].replace("%", "%%"))
            i = j + 1
        elif c == "?":
            out.append("%s")
            i += 1
        elif c == "%":
            out.append("%%")
            i += 1
        elif sql.startswith("::", i):  # a PostgreSQL cast, not a :name
            out.append("::")
            i += 2
        elif c == ":" and i + 1 < n and (sql[i + 1].isalpha() or sql[i + 1] == "_"):
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] == "_"):
                j += 1
            out.append(f"%({sql[i + 1 : j]})s")
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Row(tuple):  # type: ignore[type-arg]
    """A result row read by index or by column name, as sqlite3.Row is."""

    names: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self.names.index(key))
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        return list(self.names)


@functools.lru_cache(maxsize=256)
def _row_type(names: tuple[str, ...]) -> type[Row]:
    # One class per column list, made once: a statement's rows all share it.
    return type("Row", (Row,), {"names": names})


def _row_factory(cursor: Any) -> Any:
    return _row_type(tuple(d.name for d in cursor.description or ()))


class Cursor:
    """What the store's modules read of an sqlite3 cursor."""

    def __init__(self, cursor: Any, returns_id: bool) -> None:
        self._cursor = cursor
        self.rowcount: int = cursor.rowcount
        self.lastrowid: int | None = None
        if returns_id:
            row = cursor.fetchone()
            self.lastrowid = None if row is None else int(row[0])

    @property
    def description(self) -> Any:
        return self._cursor.description

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor)


class PgConnection:
    """A psycopg 3 connection behind sqlite3's connection methods that the store uses.

    With `connect` (a function that opens a new psycopg connection), a connection the server
    closed or that broke is replaced by a new one: by `ensure()`, which the writer calls
    between transactions (never inside one), and, with `reconnect_on_execute`, before any
    statement (for the reader, whose reads are each their own transaction).
    """

    def __init__(
        self,
        conn: Any,
        connect: Callable[[], Any] | None = None,
        *,
        reconnect_on_execute: bool = False,
    ) -> None:
        self.raw = conn
        self._connect = connect
        self._reconnect_on_execute = reconnect_on_execute and connect is not None

    def ensure(self) -> None:
        """A working connection: the one there is, or a new one if it was lost (may raise
        psycopg.OperationalError while the server cannot be reached)."""
        if self._connect is not None and (self.raw.closed or self.raw.broken):
            with contextlib.suppress(Exception):
                self.raw.close()
            self.raw = self._connect()

    def close(self) -> None:
        self.raw.close()

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Cursor:
        if self._reconnect_on_execute:
            self.ensure()
        text, returns_id = translate(sql)
        cursor = self.raw.cursor(row_factory=_rows)
        cursor.execute(text, params)
        return Cursor(cursor, returns_id)

    def executemany(self, sql: str, params: Iterable[Sequence[Any] | dict[str, Any]]) -> Cursor:
        text, _ = translate(sql)
        cursor = self.raw.cursor(row_factory=_rows)
        cursor.executemany(text, list(params))
        return Cursor(cursor, False)


def _rows(cursor: Any) -> Any:
    kind = _row_factory(cursor)

    def make(values: Sequence[Any]) -> Row:
        return kind(values)  # type: ignore[no-any-return]

    return make
