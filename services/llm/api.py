"""HTTP routes of the LLM service: OpenAI's chat API and the seed's /chat shapes."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from services.llm.answer import Done, whole
from services.llm.chat import Answering, ChatService
from services.llm.conversations import ConversationStore
from services.llm.engine import Params
from services.llm.engine.grammar import GrammarLimits
from services.llm.job import Job
from services.llm.schemas import (
    AssistantMessage,
    BatonExtras,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ConversationCard,
    ConversationCreate,
    ConversationList,
    ConversationView,
    RagOptions,
    SchemaFormat,
    SeedChatChunk,
    SeedChatRequest,
    SeedChatResponse,
    ToolCallOut,
    Usage,
    prompt_messages,
)
from services.llm.tools import BadTool, Tool, chosen, grammar, parse_calls, parse_tools, with_tools
from shared.errors import BadRequest
from shared.limits import StreamSlot
from shared.openapi import answers
from shared.protocol.models import ModelList
from shared.sse import DONE, ClosingStream, frame
from shared.web import Auth, until_disconnected
from shared.web import caller as caller_of

CLIENT_GONE = 499

Remember = Callable[[str], Awaitable[None]]
CACHE_HEADER = "X-Baton-Cache"
BACKEND_HEADER = "X-Baton-Backend"


def fresh_wanted(request: Request) -> bool:
    """``Cache-Control: no-cache``: the client wants an answer computed now."""
    return "no-cache" in request.headers.get("cache-control", "").lower()


def marked(response: Response, session: Answering) -> Response:
    response.headers[CACHE_HEADER] = "hit" if session.cached else "miss"
    response.headers[BACKEND_HEADER] = session.backend
    return response


async def client_gone(_: Request, __: Exception) -> Response:
    """ClientGone's answer, registered once by the app: nobody is left to read it."""
    return Response(status_code=CLIENT_GONE)


async def answer_whole(session: Answering, request: Request) -> tuple[str, Done]:
    """The whole answer of a request; stops within a token if its client goes away."""
    return await whole(session, lambda: until_disconnected(request))


def build_router(chat: ChatService, auth: Auth, conversations: ConversationStore) -> APIRouter:
    router = APIRouter(tags=["chat"])
    user = [Depends(auth.require("chat"))]
    chatter = [Depends(auth.caller("chat"))]

    def as_caller(job: Job, request: Request) -> Job:
        caller = caller_of(request)
        job.subject = caller.subject
        job.reveal = caller.admin or "rag:read" in caller.scopes
        return job

    async def continuing(job: Job, conversation_id: str | None) -> Job:
        """The stored conversation the job continues (404 if it is not the caller's),
        checked for room for the turn and its answer before any work."""
        if conversation_id is not None:
            conversation = await conversations.get(job.subject, conversation_id)
            await conversations.check_room(conversation, job.messages)
            job.conversation = conversation
        return job

    def remembering(job: Job) -> Remember:
        """Appends the turn and its answer to the job's conversation, if it has one."""

        async def remember(answer: str) -> None:
            if job.conversation is not None:
                await conversations.append(job.conversation, [*job.messages, {"role": "assistant", "content": answer}])

        return remember

    async def opened(job: Job, request: Request, slot: StreamSlot | None = None) -> Answering:
        """The job's session; a stream's ``slot`` is given back when none opens. A client
        gone before its turn raises ClientGone, answered 499 (``client_gone``)."""
        try:
            return await chat.open(job, lambda: until_disconnected(request))
        except BaseException:
            if slot is not None:
                await slot.close()
            raise

    @router.get("/v1/models", dependencies=user, response_model=ModelList)
    async def models() -> ModelList:
        return ModelList.of("chat", *chat.models())

    @router.post(
        "/v1/chat/completions",
        dependencies=chatter,
        response_model=None,
        responses=answers(
            "application/json",
            "text/event-stream",
            description="A completion, or its stream",
            json=ChatCompletion,
            events=ChatCompletionChunk,
        ),
    )
    async def completions(
        body: ChatCompletionRequest, request: Request, response: Response
    ) -> Response | ChatCompletion:
        chat.check_model(body.model)
        calling = _tooling(body, chat.engine.grammar_limits, chat.settings.max_tools)
        params = _params(body, chat.max_tokens(body.max_completion_tokens or body.max_tokens, also=body.max_tokens))
        params.grammar = calling.grammar
        job = Job(
            messages=with_tools(prompt_messages(body.messages), calling.tools),
            params=params,
            rag=body.rag,
            model=body.model,
            route=body.route,
        )
        job = await continuing(as_caller(job, request), body.conversation)
        job.use_cache = not fresh_wanted(request)
        slot = await auth.stream_slot(request) if body.stream else None
        session = await opened(job, request, slot)
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        if slot is not None:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _openai_stream(
                session, completion_id, created, chat.model_id, include_usage, remembering(job), calling.active
            )
            return marked(_stream(stream, session, slot), session)
        text, done = await answer_whole(session, request)
        await remembering(job)(text)
        marked(response, session)
        calls = parse_calls(text) if calling.active else None
        message = (
            AssistantMessage(content=None, tool_calls=[ToolCallOut(**c.public()) for c in calls])
            if calls
            else AssistantMessage(content=text)
        )
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=chat.model_id,
            choices=[
                Choice(
                    index=0, message=message, finish_reason="tool_calls" if calls else done.finish_reason, logprobs=None
                )
            ],
            usage=Usage(**done.usage()),
            sources=done.sources,
            baton=BatonExtras(**_extras(done)),
        )

    @router.post("/chat", dependencies=chatter, response_model=SeedChatResponse)
    async def seed_chat(body: SeedChatRequest, request: Request, response: Response) -> Response | SeedChatResponse:
        job = await continuing(as_caller(_seed_job(chat, body), request), body.conversation_id)
        job.use_cache = not fresh_wanted(request)
        session = await opened(job, request)
        text, done = await answer_whole(session, request)
        await remembering(job)(text)
        marked(response, session)
        return SeedChatResponse(
            response=text,
            model=chat.model_id,
            usage=Usage(**done.usage()),
            rag_context_used=done.rag_context_used,
            sources=done.sources,
            gpu_wait_time=done.gpu_wait_time,
            inference_time=done.inference_time,
        )

    @router.post(
        "/chat/stream",
        dependencies=chatter,
        response_model=None,
        responses=answers("text/event-stream", events=SeedChatChunk),
    )
    async def seed_chat_stream(body: SeedChatRequest, request: Request) -> Response:
        job = await continuing(as_caller(_seed_job(chat, body), request), body.conversation_id)
        job.use_cache = not fresh_wanted(request)
        slot = await auth.stream_slot(request)
        session = await opened(job, request, slot)

        async def frames() -> AsyncIterator[str]:
            pieces = []
            async for piece in session.tokens():
                pieces.append(piece)
                yield frame({"token": piece, "done": False})
            done = session.result
            await remembering(job)("".join(pieces))
            yield frame(
                {
                    "token": "",
                    "done": True,
                    "usage": done.usage(),
                    "sources": done.sources,
                    "rag_context_used": done.rag_context_used,
                    "gpu_wait_time": done.gpu_wait_time,
                    "inference_time": done.inference_time,
                }
            )

        return marked(_stream(frames(), session, slot), session)

    @router.post("/v1/conversations", dependencies=chatter, status_code=201, response_model=ConversationCard)
    async def create_conversation(body: ConversationCreate, request: Request) -> dict[str, Any]:
        created = await conversations.create(caller_of(request).subject, body.title)
        return created.public(with_messages=False)

    @router.get("/v1/conversations", dependencies=chatter, response_model=ConversationList)
    async def list_conversations(request: Request) -> dict[str, Any]:
        owned = await conversations.owned(caller_of(request).subject)
        return {"data": [c.public(with_messages=False) for c in owned]}

    @router.get("/v1/conversations/{conversation_id}", dependencies=chatter, response_model=ConversationView)
    async def get_conversation(conversation_id: str, request: Request) -> dict[str, Any]:
        return (await conversations.get(caller_of(request).subject, conversation_id)).public()

    @router.delete("/v1/conversations/{conversation_id}", dependencies=chatter, status_code=204)
    async def delete_conversation(conversation_id: str, request: Request) -> Response:
        await conversations.delete(caller_of(request).subject, conversation_id)
        return Response(status_code=204)

    return router


def _params(body: ChatCompletionRequest, max_tokens: int) -> Params:
    schema = None
    fmt = body.response_format
    if isinstance(fmt, SchemaFormat):
        schema = fmt.json_schema.schema_
    return Params(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stops(),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        json_schema=schema,
        json_object=fmt is not None and fmt.type == "json_object",
    )


@dataclass(frozen=True)
class Calling:
    """What a request's tools ask of the answer."""

    tools: list[Tool]
    """Those described to the model (none with tool_choice none)."""
    grammar: str | None

    @property
    def active(self) -> bool:
        return bool(self.tools)


def _tooling(body: ChatCompletionRequest, limits: GrammarLimits, max_tools: int) -> Calling:
    """The request's tools and tool_choice, checked before any work (400 naming the tool and the field)."""
    if len(body.tools or []) > max_tools:
        raise BadRequest(f"at most {max_tools} tools (GEMMA_MAX_TOOLS)", param="tools", code="invalid_tool")
    try:
        tools = parse_tools(body.tools or [], limits)
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
        mode, callable_ = chosen(tools, choice)
    except BadTool as exc:
        raise BadRequest(str(exc), param=exc.param, code="invalid_tool") from None
    if callable_ and body.response_format is not None and body.response_format.type != "text":
        raise BadRequest("response_format and tools cannot constrain one answer together", param="response_format")
    # One call per answer unless the request asks for more: OpenAI's default is parallel,
    # but small models then repeat calls until max_tokens (seen with SmolLM2).
    try:
        text = grammar(mode, callable_, body.parallel_tool_calls is True)
    except Exception as exc:  # the converter raises anything from KeyError to RecursionError
        raise BadRequest(
            f"the tools' parameters cannot constrain the output together ({type(exc).__name__})",
            param="tools",
            code="invalid_tool",
        ) from None
    return Calling(callable_, text)


def _seed_job(chat: ChatService, body: SeedChatRequest) -> Job:
    return Job(
        messages=prompt_messages(body.messages),
        params=Params(max_tokens=chat.max_tokens(body.max_tokens), temperature=body.temperature),
        rag=RagOptions(top_k=body.rag_top_k) if body.use_rag else None,
        context=body.context,
    )


def _extras(done: Done) -> dict[str, Any]:
    return {
        "device": done.device,
        "gpu_wait_time": done.gpu_wait_time,
        "inference_time": done.inference_time,
        "rag_context_used": done.rag_context_used,
        "warnings": done.warnings,
    }


def _openai_stream(
    session: Answering,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    remember: Remember,
    tooling: bool = False,
) -> AsyncIterator[str]:
    """Content as it comes; with tools, an answer that opens with ``{`` is a call: held
    until it is whole, then sent as ``tool_calls`` deltas, one per call."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return frame(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
            }
        )

    async def frames() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        pieces: list[str] = []
        undecided = tooling  # until the first visible character says whether this is a call
        held = False  # a call: kept until it is whole
        async for piece in session.tokens():
            pieces.append(piece)
            if undecided:
                started = "".join(pieces).lstrip()
                if not started:
                    continue
                undecided, held = False, started.startswith("{")
                piece = "".join(pieces)
            if not held:
                yield chunk({"content": piece})
        done = session.result
        text = "".join(pieces)
        await remember(text)
        finish = done.finish_reason
        if held or undecided:
            calls = parse_calls(text)
            if calls:
                for index, call in enumerate(calls):
                    yield chunk({"tool_calls": [call.public(index)]})
                finish = "tool_calls"
            elif text:
                yield chunk({"content": text})  # cut off by max_tokens before the call was whole
        yield chunk({}, finish, sources=done.sources, baton=_extras(done))
        if include_usage:
            yield frame(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": done.usage(),
                }
            )
        yield DONE

    return frames()


def _stream(frames: AsyncIterator[str], session: Answering, slot: StreamSlot) -> Response:
    """The session is closed however the stream ends (the client gone unless it
    finished), and the user's stream slot given back."""

    async def close(finished: bool) -> None:
        try:
            await session.close(client_gone=not finished)
        finally:
            await slot.close()

    return ClosingStream(frames, close)
