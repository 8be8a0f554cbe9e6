"""What the model wrote, parsed by a real SQL parser and checked against the schema.

The grammar should make every check here pass; this is the line that holds if it
does not (a grammar bug, a schema the grammar reads differently). The statement that
runs is the one sqlglot prints from the checked tree, with its row limit, never the
model's text.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import OptimizeError, ParseError, SqlglotError
from sqlglot.optimizer.qualify import qualify

from services.llm.sql.schema import Schema

FUNCTIONS: tuple[type[exp.Func], ...] = (
    exp.Count,
    exp.Sum,
    exp.Avg,
    exp.Min,
    exp.Max,
    exp.Lower,
    exp.Upper,
    exp.Length,
    exp.Abs,
    exp.Round,
    exp.Coalesce,
    exp.And,
    exp.Or,
    exp.Exists,
)
"""Functions a statement may call: aggregates and a few pure ones. Anything else
(``load_extension``, ``pg_sleep``, ``pg_read_file``, ``set_config``, ...) is refused.
AND, OR and EXISTS are operators that sqlglot models as functions too."""

FORBIDDEN: tuple[type[exp.Expression], ...] = (exp.Into, exp.Lock, exp.With, exp.Placeholder, exp.Parameter)
"""Inside a SELECT: ``SELECT ... INTO`` writes a table, ``FOR UPDATE`` takes locks,
``WITH`` may hide a data-modifying statement (PostgreSQL), placeholders have no value."""


class Refused(ValueError):
    """Not one read-only SELECT over the schema; the message says why."""


@dataclass(frozen=True)
class Checked:
    sql: str
    """As it is shown: sqlglot's rendering, limited to ``max_rows``."""
    run_sql: str
    """As it runs: limited to one row more than shown, so a cut can be seen."""
    tables: list[str]
    limited: bool
    """Whether ``run_sql`` carries the service's limit (it may cut the result)."""


def check(text: str, schema: Schema, dialect: str, max_rows: int) -> Checked:
    statement = _one_select(text, dialect)
    for node in statement.walk():
        if isinstance(node, FORBIDDEN):
            raise Refused(f"{node.key.upper()} is not allowed")
        if isinstance(node, exp.Func) and not isinstance(node, FUNCTIONS):
            name = node.sql_name() if not isinstance(node, exp.Anonymous) else node.name
            raise Refused(f"the function {name.upper()} is not allowed")
    tables = []
    for table in statement.find_all(exp.Table):
        if table.args.get("db") or table.args.get("catalog"):
            raise Refused(f"{table.sql(dialect)}: tables are named without a schema or database")
        if table.name not in schema.tables:
            raise Refused(f"no table is named {table.name}")
        if table.name not in tables:
            tables.append(table.name)
    try:
        qualify(statement.copy(), schema=schema.for_sqlglot(), dialect=dialect, validate_qualify_columns=True)
    except OptimizeError as exc:
        raise Refused(str(exc).split(". Line:")[0]) from None
    except SqlglotError as exc:
        raise Refused(f"the statement cannot be checked: {exc}") from None
    own = _own_limit(statement)
    shown = min(own, max_rows) if own is not None else max_rows
    limited = own is None or own > max_rows
    run = max_rows + 1 if limited else shown
    return Checked(
        sql=statement.limit(shown).sql(dialect, comments=False),
        run_sql=statement.limit(run).sql(dialect, comments=False),
        tables=tables,
        limited=limited,
    )


def _one_select(text: str, dialect: str) -> exp.Select:
    try:
        statements = [s for s in sqlglot.parse(text, read=dialect) if s is not None]
    except ParseError as exc:
        detail = exc.errors[0] if exc.errors else {}
        raise Refused(f"not valid SQL: {detail.get('description', 'it does not parse')}") from None
    except SqlglotError:
        raise Refused("not valid SQL") from None
    if len(statements) != 1:
        raise Refused(f"one statement is allowed, not {len(statements)}")
    statement = statements[0]
    if not isinstance(statement, exp.Select):
        raise Refused(f"only SELECT is allowed, not {statement.key.upper()}")
    return statement


def _own_limit(statement: exp.Select) -> int | None:
    limit = statement.args.get("limit")
    if limit is None:
        return None
    value = limit.expression
    if not (isinstance(value, exp.Literal) and value.is_int):
        raise Refused("LIMIT must be a whole number")
    return int(value.this)
