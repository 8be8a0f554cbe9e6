"""Routes of text-to-SQL: ``POST /v1/sql``, and the seed's ``POST /query`` and ``GET /info``.
Module-level functions with typed dependencies: the chat service and the SQL service
the app was built with (``app.state.chat``, ``app.state.sql``)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from services.llm.chat.answer import whole
from services.llm.chat.routes import Chat
from services.llm.chat.service import ChatService
from services.llm.engine import Params
from services.llm.sql.schemas import SeedInfo, SeedQueryRequest, SeedQueryResponse, SqlRequest, SqlResponse
from services.llm.sql.service import Result, SqlService, Target
from shared.web import calling, signed_in, until_disconnected

REFUSED: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "The statement the model wrote was refused (invalid_sql), or the database refused "
        "or stopped it (query_failed, query_timeout); nothing was changed"
    }
}
DEFAULT_MAX_TOKENS = 256
"""A statement's tokens when the request gives none: room for a three-table join."""


def sql_service(request: Request) -> SqlService:
    found: SqlService = request.app.state.sql
    return found


Sql = Annotated[SqlService, Depends(sql_service)]
CHATTER = [Depends(calling("chat"))]

router = APIRouter(tags=["sql"])


async def answer(
    chat: ChatService,
    sql: SqlService,
    target: Target,
    question: str,
    temperature: float,
    max_tokens: int | None,
    request: Request,
    execute: bool = False,
    max_rows: int = 100,
) -> tuple[Result, int]:
    """The checked statement (run when asked) and the tokens the model spent on it."""
    limit = chat.max_tokens(max_tokens if max_tokens is not None else min(DEFAULT_MAX_TOKENS, chat.settings.max_tokens))
    job = sql.job(target, question, Params(max_tokens=limit, temperature=temperature))
    session = await chat.open(job, lambda: until_disconnected(request))
    text, done = await whole(session, lambda: until_disconnected(request))
    return await sql.finish(text, target, execute, max_rows), done.completion_tokens


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


@router.post("/v1/sql", dependencies=CHATTER, response_model=SqlResponse, responses=REFUSED)
async def to_sql(body: SqlRequest, request: Request, chat: Chat, sql: Sql) -> SqlResponse:
    started = time.monotonic()
    sql.check_question(body.question)
    target = await sql.target(body.schema_, body.database)
    result, tokens = await answer(
        chat, sql, target, body.question, body.temperature, body.max_tokens, request, body.execute, body.max_rows
    )
    return SqlResponse(
        sql=result.sql,
        tables=result.tables,
        columns=result.columns,
        rows=result.rows,
        truncated=result.truncated,
        tokens=tokens,
        latency_ms=elapsed_ms(started),
    )


@router.post("/query", dependencies=CHATTER, response_model=SeedQueryResponse, responses=REFUSED)
async def seed_query(body: SeedQueryRequest, request: Request, chat: Chat, sql: Sql) -> SeedQueryResponse:
    started = time.monotonic()
    sql.check_question(body.prompt, param="prompt")
    target = await sql.default_target()
    result, tokens = await answer(chat, sql, target, body.prompt, body.temperature, body.max_tokens, request)
    return SeedQueryResponse(response=result.sql, tokens=tokens, latency_ms=elapsed_ms(started))


@router.get("/info", dependencies=[Depends(signed_in())], response_model=SeedInfo)
async def seed_info(request: Request) -> dict[str, Any]:
    """The seed's ``GET /info``: the model, its threads and context, the version."""
    about: dict[str, Any] = request.app.state.seed_info()
    return about
