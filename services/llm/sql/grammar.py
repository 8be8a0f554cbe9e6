"""GBNF that spells one SELECT over a schema's tables and columns, and nothing else.

SQL names its columns before its tables, and which columns are real depends on the
tables. The grammar therefore has one branch per FROM clause it allows: each table
alone (columns bare), and each join of up to ``MAX_JOINED`` tables along the schema's
foreign keys, from each of its tables (columns as ``table.column``, ``JOIN ... ON``
spelled from the key). llama.cpp follows every branch the text so far still fits, so
the model picks its columns first and the FROM clause follows from them.

Within a branch: ``DISTINCT``, ``*`` or up to six columns and aggregates (COUNT, SUM,
AVG, MIN, MAX), ``WHERE`` with up to four comparisons joined by AND/OR (=, !=, <, <=,
>, >=, LIKE, IN, BETWEEN, IS [NOT] NULL, against literals), ``GROUP BY`` with
``HAVING``, ``ORDER BY`` and ``LIMIT``. String literals hold no quote and no control
character, so no literal can end early; the statement ends with ``;``.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from services.llm.sql.schema import Schema, Table

MAX_JOINED = 3
"""Tables in one FROM clause at most."""
MAX_BRANCHES = 160
"""FROM clauses the grammar lists at most (single tables first, then smaller joins)."""


@dataclass(frozen=True)
class From:
    text: str
    """``orders JOIN customers ON orders.customer_id = customers.id``."""
    columns: list[str]
    """Every column the branch may name, as it must be written."""


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _alternatives(items: list[str]) -> str:
    return " | ".join(_quote(i) for i in items)


def from_clauses(schema: Schema) -> list[From]:
    """The FROM clauses the grammar allows, smallest first."""
    clauses = [From(t.name, t.column_names()) for t in schema.tables.values()]
    edges = schema.edges()
    neighbours: dict[str, list[tuple[str, str, str, str]]] = {name: [] for name in schema.tables}
    for edge in edges:
        table, _, target, _ = edge
        if table != target:
            neighbours[table].append(edge)
            neighbours[target].append(edge)
    seen: set[frozenset[str]] = set()
    for size in range(2, MAX_JOINED + 1):
        for group in _connected(schema, neighbours, size):
            if group in seen:
                continue
            seen.add(group)
            for root in schema.tables:
                if root in group:
                    clauses.append(_joined(schema, neighbours, group, root))
                    if len(clauses) >= MAX_BRANCHES:
                        return clauses
    return clauses


def _connected(
    schema: Schema, neighbours: dict[str, list[tuple[str, str, str, str]]], size: int
) -> list[frozenset[str]]:
    groups: set[frozenset[str]] = {frozenset([name]) for name in schema.tables}
    for _ in range(size - 1):
        grown = set()
        for group in groups:
            for table in group:
                for a, _, b, _ in neighbours[table]:
                    other = b if a == table else a
                    if other not in group:
                        grown.add(group | {other})
        groups = grown
    order = list(schema.tables)
    return sorted(groups, key=lambda g: sorted(order.index(t) for t in g))


def _joined(
    schema: Schema, neighbours: dict[str, list[tuple[str, str, str, str]]], group: frozenset[str], root: str
) -> From:
    """``root JOIN ...`` in breadth-first order along the first key joining each table."""
    text = root
    placed = {root}
    queue = deque([root])
    while queue:
        table = queue.popleft()
        for a, column, b, ref in neighbours[table]:
            other = b if a == table else a
            if other in group and other not in placed:
                placed.add(other)
                queue.append(other)
                text += f" JOIN {other} ON {a}.{column} = {b}.{ref}"
    columns = [f"{t}.{c}" for t in schema.tables if t in group for c in schema.tables[t].column_names()]
    return From(text, columns)


def select_grammar(schema: Schema) -> str:
    """The whole grammar; its root spells ``SELECT ...;``."""
    clauses = from_clauses(schema)
    lines = [
        'root ::= "SELECT " ("DISTINCT ")? (' + " | ".join(f"q{i}" for i in range(len(clauses))) + ') ";"',
        'fn ::= "COUNT" | "SUM" | "AVG" | "MIN" | "MAX"',
        'op ::= " = " | " != " | " < " | " <= " | " > " | " >= "',
        'str ::= "\'" [^\'\\x00-\\x1f]{0,48} "\'"',
        'num ::= "-"? [0-9]{1,9} ("." [0-9]{1,4})?',
        "val ::= str | num",
        'test ::= op val | " IS NULL" | " IS NOT NULL" | " LIKE " str | " IN (" val (", " val){0,7} ")"'
        ' | " BETWEEN " val " AND " val',
        'dir ::= " ASC" | " DESC"',
        'lim ::= " LIMIT " [1-9] [0-9]{0,3}',
    ]
    for i, clause in enumerate(clauses):
        c, a, e = f"c{i}", f"a{i}", f"e{i}"
        lines += [
            f'q{i} ::= ("*" | {e} (", " {e}){{0,5}}) {_quote(" FROM " + clause.text)} w{i}? g{i}? o{i}? lim?',
            f"{c} ::= {_alternatives(clause.columns)}",
            f'{a} ::= "COUNT(*)" | fn "(" ("DISTINCT ")? {c} ")"',
            f"{e} ::= {c} | {a}",
            f'w{i} ::= " WHERE " {c} test ((" AND " | " OR ") {c} test){{0,3}}',
            f'g{i} ::= " GROUP BY " {c} (", " {c}){{0,2}} (" HAVING " {a} op val)?',
            f'o{i} ::= " ORDER BY " {e} dir? (", " {e} dir?)?',
        ]
    return "\n".join(lines) + "\n"


def spelled(schema: Schema) -> int:
    """Column names the grammar spells over every branch: what its cost per token grows with."""
    return sum(len(clause.columns) for clause in from_clauses(schema))


def _words(text: str) -> set[str]:
    """Lower-case words of a question or a name, plurals folded (``orders`` -> ``order``)."""
    words = {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w}
    return words | {w[:-1] for w in words if len(w) > 3 and w.endswith("s")}


def focused(schema: Schema, question: str, budget: int) -> Schema:
    """The schema itself when its grammar spells at most ``budget`` column names, else the
    tables the question speaks of most, added one by one while the grammar stays in the
    budget (at least one table; foreign keys kept between the tables kept).

    A table scores three for each of its name's words the question uses and one for each
    column's, so "Which customers ordered a lamp?" keeps customers and orders first."""
    if spelled(schema) <= budget:
        return schema
    asked = _words(question)
    order = list(schema.tables)

    def score(name: str) -> tuple[int, int]:
        table = schema.tables[name]
        columns = sum(len(_words(c) & asked) for c in table.column_names())
        return (3 * len(_words(name) & asked) + columns, -order.index(name))

    kept: list[str] = []
    for name in sorted(order, key=score, reverse=True):
        trial = _subset(schema, [*kept, name])
        if kept and spelled(trial) > budget:
            continue
        kept.append(name)
    return _subset(schema, kept)


def _subset(schema: Schema, names: list[str]) -> Schema:
    keep = set(names)
    tables = {}
    for name in schema.tables:  # declared order
        if name in keep:
            table = schema.tables[name]
            keys = [k for k in table.foreign_keys if k.table in keep]
            tables[name] = Table(table.name, list(table.columns), keys)
    return Schema(tables)
