"""A database's tables, columns and foreign keys, from DDL text or a live catalog."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MAX_TABLES = 64
MAX_COLUMNS = 128
"""Per table. The grammar holds every column of every table that may be joined, so
the schema's size bounds the grammar's."""


class BadSchema(ValueError):
    """The schema cannot be used; the message says where and why."""


@dataclass(frozen=True)
class ForeignKey:
    column: str
    table: str
    """The table referred to."""
    ref_column: str


@dataclass
class Table:
    name: str
    columns: list[tuple[str, str]]
    """(name, type) in declared order; the type as written, upper case ("" when none)."""
    foreign_keys: list[ForeignKey] = field(default_factory=list)

    def column_names(self) -> list[str]:
        return [name for name, _ in self.columns]


@dataclass
class Schema:
    tables: dict[str, Table]
    """By name, in declared order."""

    def __post_init__(self) -> None:
        if not self.tables:
            raise BadSchema("the schema has no tables")
        if len(self.tables) > MAX_TABLES:
            raise BadSchema(f"the schema has {len(self.tables)} tables; at most {MAX_TABLES}")
        for table in self.tables.values():
            _check_name(table.name, "table")
            if not table.columns:
                raise BadSchema(f"table {table.name} has no columns")
            if len(table.columns) > MAX_COLUMNS:
                raise BadSchema(f"table {table.name} has {len(table.columns)} columns; at most {MAX_COLUMNS}")
            for column, _ in table.columns:
                _check_name(column, f"column of {table.name}")
            for key in table.foreign_keys:
                target = self.tables.get(key.table)
                if target is None or key.ref_column not in target.column_names():
                    raise BadSchema(
                        f"{table.name}.{key.column} refers to {key.table}.{key.ref_column}, which is not defined"
                    )

    def for_sqlglot(self) -> dict[str, object]:
        """The mapping sqlglot's qualifier checks columns against."""
        return {t.name: {c: (kind or "TEXT") for c, kind in t.columns} for t in self.tables.values()}

    def ddl(self) -> str:
        """Compact, one table a line, as the model sees it: ``orders(id INTEGER, customer_id INTEGER)``."""
        lines = []
        for table in self.tables.values():
            columns = ", ".join(f"{c} {kind}".strip() for c, kind in table.columns)
            lines.append(f"{table.name}({columns})")
        return "\n".join(lines)

    def edges(self) -> list[tuple[str, str, str, str]]:
        """Foreign keys as (table, column, referred table, referred column)."""
        return [(t.name, k.column, k.table, k.ref_column) for t in self.tables.values() for k in t.foreign_keys]


def _check_name(name: str, what: str) -> None:
    if not NAME.match(name):
        raise BadSchema(f"the {what} name {name!r} is not a plain identifier (letters, digits, _)")


def parse_ddl(text: str) -> Schema:
    """Only ``CREATE TABLE`` statements; BadSchema naming the first problem."""
    try:
        statements = [s for s in sqlglot.parse(text) if s is not None]
    except ParseError as exc:
        detail = exc.errors[0] if exc.errors else {}
        where = f" at line {detail['line']}" if detail.get("line") else ""
        raise BadSchema(f"the schema does not parse{where}: {detail.get('description', 'invalid SQL')}") from None
    except SqlglotError:  # the tokenizer's: an unterminated quote or comment, a stray character
        raise BadSchema("the schema does not parse: an unterminated quote or comment, or a stray character") from None
    tables: dict[str, Table] = {}
    for statement in statements:
        if not (
            isinstance(statement, exp.Create) and statement.kind == "TABLE" and isinstance(statement.this, exp.Schema)
        ):
            raise BadSchema(f"the schema may hold only CREATE TABLE statements, not {statement.key.upper()}")
        table = _table(statement.this)
        if table.name in tables:
            raise BadSchema(f"table {table.name} is defined twice")
        tables[table.name] = table
    return Schema(tables)


def _table(definition: exp.Schema) -> Table:
    name = definition.this.name
    columns: list[tuple[str, str]] = []
    keys: list[ForeignKey] = []
    for item in definition.expressions:
        if isinstance(item, exp.ColumnDef):
            kind = item.args.get("kind")
            columns.append((item.name, kind.sql().upper() if kind is not None else ""))
            for reference in item.find_all(exp.Reference):
                keys.extend(_references(reference, [item.name]))
        elif isinstance(item, exp.ForeignKey):
            referred = item.args.get("reference")
            if isinstance(referred, exp.Reference):
                keys.extend(_references(referred, [e.name for e in item.expressions]))
    return Table(name, columns, keys)


def _references(reference: exp.Reference, columns: list[str]) -> list[ForeignKey]:
    target = reference.this
    if not isinstance(target, exp.Schema):
        return []
    refs = [e.name for e in target.expressions]
    return [ForeignKey(c, target.this.name, r) for c, r in zip(columns, refs, strict=False)]
