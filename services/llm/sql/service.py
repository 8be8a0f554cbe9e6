"""From a question to a checked SELECT and, when asked, its rows. No FastAPI here.

The model answers through the chat service like any request (the queue, the GPU
lease, the response cache), prompted with a few examples over a schema of its own and
constrained by the grammar built from the question's schema. Whatever it writes is
then checked (services.llm.sql.check) and only the checked statement ever runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from services.llm.chat.job import Job
from services.llm.engine import Message, Params
from services.llm.sql.check import Checked, Refused, check
from services.llm.sql.databases import Database, DatabaseUnavailable, QueryFailed, QueryTimeout
from services.llm.sql.grammar import focused, select_grammar
from services.llm.sql.schema import BadSchema, Schema, parse_ddl
from shared.errors import BadRequest, ServiceUnavailable, Unprocessable

log = logging.getLogger(__name__)

MAX_QUESTION_BYTES = 4096
MAX_SCHEMA_BYTES = 65536

INSTRUCTION = (
    "You turn a question about a database into one SQL SELECT statement over the tables given. "
    "Use only those tables and columns. Answer with the statement alone."
)

EXAMPLES = [
    ("List the names of all employees.", "SELECT name FROM employees;"),
    ("How many departments are there?", "SELECT COUNT(*) FROM departments;"),
    ("Which employees earn more than 5000?", "SELECT name FROM employees WHERE salary > 5000;"),
    (
        "What is the average salary in each department?",
        "SELECT department_id, AVG(salary) FROM employees GROUP BY department_id;",
    ),
    (
        "Show the three most recently hired employees.",
        "SELECT name, hired_on FROM employees ORDER BY hired_on DESC LIMIT 3;",
    ),
    (
        "Which employees work in Paris?",
        "SELECT employees.name FROM employees JOIN departments ON employees.department_id = departments.id "
        "WHERE departments.city = 'Paris';",
    ),
]
"""Few-shot examples over tables of their own (employees, departments), so none of
them is a user's answer. In one message, ending in ``SQL:``: of the forms tried on the
labelled set (tests/services/llm/data/sql_questions.json) with SmolLM2, this one was
right most often (4 of 44; examples as separate chat turns: 1; CREATE TABLE text
instead of the compact form: 0; no examples: 0)."""


def prompt(schema: Schema | None, question: str) -> list[Message]:
    """The model's messages; with no schema, only the words every question starts with
    (the instruction and the examples: any user may reuse their KV cells)."""
    examples = "\n".join(f"Question: {asked}\nSQL: {answer}" for asked, answer in EXAMPLES)
    asked = f"Examples, for other tables:\n{examples}\n\nTables:\n"
    if schema is not None:
        asked += f"{schema.ddl()}\nQuestion: {question}\nSQL:"
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": asked}]


@dataclass(frozen=True)
class Target:
    """What a question is asked over: a schema alone, or a configured database."""

    schema: Schema
    dialect: str
    database: Database | None


@dataclass(frozen=True)
class Result:
    sql: str
    tables: list[str]
    columns: list[str] | None
    rows: list[list[Any]] | None
    truncated: bool


class SqlService:
    def __init__(
        self, databases: dict[str, Database], default: str | None, timeout_s: float, max_grammar_columns: int = 400
    ) -> None:
        self.max_grammar_columns = max_grammar_columns
        self.databases = databases
        self.default = default
        self.timeout_s = timeout_s

    async def target(self, schema: str | None, database: str | None) -> Target:
        """400 for a schema that does not parse or a database that is not configured."""
        if (schema is None) == (database is None):
            raise BadRequest("give exactly one of schema and database", param="schema", code="invalid_value")
        if schema is not None:
            if len(schema.encode()) > MAX_SCHEMA_BYTES:
                raise BadRequest(
                    f"the schema is over {MAX_SCHEMA_BYTES // 1024} KB", param="schema", code="schema_too_long"
                )
            try:
                return Target(parse_ddl(schema), "sqlite", None)
            except BadSchema as exc:
                raise BadRequest(str(exc), param="schema", code="invalid_schema") from None
        assert database is not None
        found = self.databases.get(database)
        if found is None:
            names = ", ".join(sorted(self.databases)) or "none (GEMMA_SQL_DATABASES)"
            raise BadRequest(
                f"no database is named {database!r}; configured: {names}", param="database", code="unknown_database"
            )
        try:
            # A thread: reading a PostgreSQL catalog the first time waits on the network.
            return Target(await asyncio.to_thread(found.schema), found.dialect, found)
        except DatabaseUnavailable as exc:
            raise ServiceUnavailable(str(exc), retry_after_s=5, code="database_unavailable") from None
        except BadSchema as exc:
            raise ServiceUnavailable(
                f"the database {database}'s schema cannot be used: {exc}", code="database_unusable"
            ) from None

    async def default_target(self) -> Target:
        if self.default is None:
            raise BadRequest("no database is configured (GEMMA_SQL_DATABASES)", code="unknown_database")
        return await self.target(None, self.default)

    async def read_schemas(self) -> None:
        """At start: every database's schema (SQLite's are read already). One that cannot
        be reached now is read on its first question instead."""
        for database in self.databases.values():
            try:
                await asyncio.to_thread(database.schema)
            except DatabaseUnavailable:
                pass  # logged by the database, by name
            except BadSchema as exc:
                log.warning("database schema unusable", extra={"database": database.name, "reason": str(exc)})

    @staticmethod
    def check_question(question: str, param: str = "question") -> None:
        if not question.strip():
            raise BadRequest("the question is empty", param=param, code="invalid_value")
        if len(question.encode()) > MAX_QUESTION_BYTES:
            raise BadRequest(
                f"the question is over {MAX_QUESTION_BYTES // 1024} KB", param=param, code="question_too_long"
            )

    def job(self, target: Target, question: str, params: Params) -> Job:
        """The model's request: a wide schema is narrowed to the tables the question speaks
        of, so that the grammar spells at most ``max_grammar_columns`` column names (its
        cost per token grows with them); the prompt shows the same tables."""
        schema = focused(target.schema, question, self.max_grammar_columns)
        params.grammar = select_grammar(schema)
        params.grammar_param = "database" if target.database is not None else "schema"
        return Job(messages=prompt(schema, question), params=params, shared_prefix=prompt(None, ""))

    async def finish(self, text: str, target: Target, execute: bool, max_rows: int) -> Result:
        """Check what the model wrote (422 if refused); run it when asked and a database is named."""
        try:
            checked = check(text, target.schema, target.dialect, max_rows)
        except Refused as exc:
            written = text.strip()[:300]
            raise Unprocessable(f"refused {written!r}: {exc}; nothing ran", code="invalid_sql") from None
        if not execute or target.database is None:
            return Result(checked.sql, checked.tables, None, None, False)
        return await self._run(checked, target.database, max_rows)

    async def _run(self, checked: Checked, database: Database, max_rows: int) -> Result:
        try:
            found = await asyncio.to_thread(database.run, checked.run_sql, max_rows + 1, self.timeout_s)
        except QueryTimeout as exc:
            raise Unprocessable(f"{checked.sql}: {exc}", code="query_timeout") from None
        except QueryFailed as exc:
            raise Unprocessable(f"{checked.sql}: the database refused it: {exc}", code="query_failed") from None
        except DatabaseUnavailable as exc:
            raise ServiceUnavailable(str(exc), retry_after_s=5, code="database_unavailable") from None
        truncated = checked.limited and len(found.rows) > max_rows
        return Result(checked.sql, checked.tables, found.columns, found.rows[:max_rows], truncated)

    def info(self) -> list[dict[str, Any]]:
        return [
            {"name": d.name, "kind": d.kind, "default": d.name == self.default, "tables": d.tables}
            for d in self.databases.values()
        ]
