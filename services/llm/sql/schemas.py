"""Bodies of ``POST /v1/sql`` and the seed's ``POST /query``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from services.llm.sql.service import MAX_QUESTION_BYTES, MAX_SCHEMA_BYTES
from shared.wire import Boolean, Number, PositiveInteger

MAX_ROWS = 1000


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_QUESTION_BYTES, description="In plain language; at most 4 KB")
    schema_: str | None = Field(
        default=None,
        alias="schema",
        max_length=MAX_SCHEMA_BYTES,
        description="DDL (CREATE TABLE statements); exactly one of schema and database",
    )
    database: str | None = Field(default=None, max_length=64, description="A database named in GEMMA_SQL_DATABASES")
    execute: Boolean = Field(default=False, description="Run the statement (a database only) and return its rows")
    max_rows: PositiveInteger = Field(default=100, le=MAX_ROWS, description="Rows returned at most; the SQL's LIMIT")
    temperature: Number = Field(default=0.0, ge=0, le=2)
    max_tokens: PositiveInteger | None = Field(default=None, description="Tokens the statement may take")


class SqlResponse(BaseModel):
    sql: str
    tables: list[str]
    columns: list[str] | None
    rows: list[list[JsonValue]] | None
    truncated: bool
    tokens: int
    latency_ms: int


class SeedQueryRequest(BaseModel):
    """The seed's text-to-SQL body, over the default database."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_QUESTION_BYTES, description="The question; at most 4 KB")
    temperature: Number = Field(default=0.0, ge=0, le=2)
    max_tokens: PositiveInteger | None = None


class SeedInfo(BaseModel):
    """The seed's ``GET /info``."""

    model: str
    threads: int | None
    context_size: int
    version: str


class SeedQueryResponse(BaseModel):
    response: str
    tokens: int
    latency_ms: int
