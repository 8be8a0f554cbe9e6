"""Databases named in the settings, read at start-up and queried read-only.

SQLite is opened with ``mode=ro`` under an authorizer that allows reading and the
checked functions only, and a progress handler stops a statement past its time.
PostgreSQL runs each statement in a ``READ ONLY`` transaction with a
``statement_timeout``, rolled back afterwards; the role in the URL should be
read-only too (docs/api.md, Text-to-SQL). No URL, host or password ever leaves this module: errors
name the database by its configured name.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from services.llm.sql.schema import BadSchema, ForeignKey, Schema, Table

log = logging.getLogger(__name__)

TABLES = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
SQLITE_FUNCTIONS = frozenset(
    {"count", "sum", "avg", "min", "max", "lower", "upper", "length", "abs", "round", "coalesce", "like"}
)


class QueryFailed(ValueError):
    """The database refused the statement (its own message, without addresses)."""


class QueryTimeout(QueryFailed):
    pass


class DatabaseUnavailable(Exception):
    """The database cannot be reached now."""


@dataclass(frozen=True)
class Rows:
    columns: list[str]
    rows: list[list[Any]]


def cell(value: Any) -> Any:
    """A value JSON can carry."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return str(value)  # UUID, interval, ...


class Database:
    name: str
    kind: str
    dialect: str
    _schema: Schema | None = None

    @property
    def tables(self) -> int | None:
        """Tables in its schema, once read."""
        return len(self._schema.tables) if self._schema is not None else None

    def schema(self) -> Schema:
        raise NotImplementedError

    def run(self, sql: str, max_rows: int, timeout_s: float) -> Rows:
        """At most ``max_rows`` rows; blocking (call it in a thread)."""
        raise NotImplementedError


class SqliteDatabase(Database):
    kind = "sqlite"
    dialect = "sqlite"

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self._schema: Schema | None = None

    def _open(self, timeout_s: float) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        return sqlite3.connect(uri, uri=True, timeout=timeout_s, check_same_thread=False)

    def schema(self) -> Schema:
        if self._schema is None:
            db = self._open(5.0)
            try:
                names = [r[0] for r in db.execute(TABLES)]
                tables = {}
                for name in names:
                    columns = [(r[1], str(r[2]).upper()) for r in db.execute(f"PRAGMA table_info({_ident(name)})")]
                    keys = [
                        ForeignKey(r[3], r[2], r[4] or "id")
                        for r in db.execute(f"PRAGMA foreign_key_list({_ident(name)})")
                    ]
                    tables[name] = Table(name, columns, keys)
            finally:
                db.close()
            self._schema = Schema(tables)
        return self._schema

    def run(self, sql: str, max_rows: int, timeout_s: float) -> Rows:
        db = self._open(timeout_s)
        deadline = time.monotonic() + timeout_s
        try:
            db.set_authorizer(_sqlite_authorizer)
            db.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
            cursor = db.execute(sql)
            columns = [d[0] for d in cursor.description or ()]
            rows = [[cell(v) for v in row] for row in cursor.fetchmany(max_rows)]
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                raise QueryTimeout(f"the query ran longer than {timeout_s:g} s and was stopped") from None
            raise QueryFailed(str(exc)) from None
        except sqlite3.DatabaseError as exc:
            raise QueryFailed(str(exc)) from None
        finally:
            db.close()
        return Rows(columns, rows)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_authorizer(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    """Reading and the allowed functions; everything else (writes, PRAGMA, ATTACH) is denied."""
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in SQLITE_FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class PostgresDatabase(Database):
    kind = "postgresql"
    dialect = "postgres"

    def __init__(self, name: str, url: str, connect_timeout_s: float = 5.0) -> None:
        self.name = name
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._schema: Schema | None = None
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        import psycopg  # imported here: only a PostgreSQL database needs it

        try:
            return psycopg.connect(self._url, connect_timeout=max(1, round(self._connect_timeout_s)))
        except psycopg.OperationalError:
            # psycopg's message names the host and port: kept out of answers and logs
            log.warning("database unreachable", extra={"database": self.name})
            raise DatabaseUnavailable(f"the database {self.name} cannot be reached") from None

    def schema(self) -> Schema:
        with self._lock:
            if self._schema is None:
                self._schema = self._read_schema()
            return self._schema

    def _read_schema(self) -> Schema:
        with self._connect() as conn:
            conn.read_only = True
            columns = conn.execute(
                "SELECT table_name, column_name, upper(data_type) FROM information_schema.columns"
                " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
            ).fetchall()
            keys = conn.execute(
                "SELECT k.table_name, k.column_name, c.table_name, c.column_name"
                " FROM information_schema.table_constraints t"
                " JOIN information_schema.key_column_usage k"
                "   ON k.constraint_name = t.constraint_name AND k.table_schema = t.table_schema"
                " JOIN information_schema.constraint_column_usage c"
                "   ON c.constraint_name = t.constraint_name AND c.table_schema = t.table_schema"
                " WHERE t.constraint_type = 'FOREIGN KEY' AND t.table_schema = current_schema()"
            ).fetchall()
            conn.rollback()
        tables: dict[str, Table] = {}
        for table, column, kind in columns:
            tables.setdefault(table, Table(table, [])).columns.append((column, kind))
        for table, column, target, ref in keys:
            if table in tables:
                tables[table].foreign_keys.append(ForeignKey(column, target, ref))
        return Schema(tables)

    def run(self, sql: str, max_rows: int, timeout_s: float) -> Rows:
        import psycopg

        with self._connect() as conn:
            conn.read_only = True
            try:
                with conn.cursor() as cursor:
                    cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout_s * 1000))}")
                    cursor.execute(sql)
                    columns = [d.name for d in cursor.description or ()]
                    rows = [[cell(v) for v in row] for row in cursor.fetchmany(max_rows)]
            except psycopg.errors.QueryCanceled:
                raise QueryTimeout(f"the query ran longer than {timeout_s:g} s and was stopped") from None
            except psycopg.Error as exc:
                message = exc.diag.message_primary or type(exc).__name__
                raise QueryFailed(message) from None
            finally:
                conn.rollback()
        return Rows(columns, rows)


class BadDatabaseUrl(ValueError):
    pass


def open_database(name: str, url: str) -> Database:
    """``sqlite:///relative.db``, ``sqlite:////absolute.db`` (SQLAlchemy's form), a plain
    path, or ``postgresql://...``. A SQLite file is read now: a missing or unreadable
    one is a configuration error; a PostgreSQL server is read when first used."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(name, url)
    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else Path(url)
    if "://" in url and not url.startswith("sqlite:///"):
        raise BadDatabaseUrl(f"{name}: only sqlite:/// and postgresql:// URLs are understood")
    if not path.is_file():
        raise BadDatabaseUrl(f"{name}: no SQLite file at {path}")
    database = SqliteDatabase(name, path)
    try:
        database.schema()
    except (sqlite3.Error, BadSchema) as exc:
        raise BadDatabaseUrl(f"{name}: {exc}") from None
    return database
