"""HTTP routes of the LLM service: OpenAI's chat API, the seed's /chat shapes and the
stored conversations. Module-level functions with typed dependencies: the caller, and
the service objects the app was built with (``app.state``). A route translates its
request (translate.py), opens a session and answers it whole or as a stream."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from services.llm.chat.answer import Done, whole
from services.llm.chat.choices import Whole, close_all, whole_choices
from services.llm.chat.job import Job
from services.llm.chat.schemas import (
    AssistantMessage,
    BatonExtras,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ConversationCard,
    ConversationCreate,
    ConversationList,
    ConversationView,
    SeedChatChunk,
    SeedChatRequest,
    SeedChatResponse,
    ToolCallOut,
    Usage,
    logprobs_out,
)
from services.llm.chat.service import Answering, ChatService
from services.llm.chat.streaming import closing, extras, openai_frames, seed_frames, usage_of
from services.llm.chat.translate import Translator
from services.llm.conversations.store import ConversationStore
from services.llm.tools.calls import parse_calls
from shared.limits import StreamSlot
from shared.openapi import answers
from shared.protocol.models import ModelCard, ModelList, found_model
from shared.web import Caller, calling, signed_in, stream_slot, until_disconnected

CLIENT_GONE = 499
CACHE_HEADER = "X-Baton-Cache"
BACKEND_HEADER = "X-Baton-Backend"


def chat_service(request: Request) -> ChatService:
    found: ChatService = request.app.state.chat
    return found


def conversation_store(request: Request) -> ConversationStore:
    found: ConversationStore = request.app.state.conversations
    return found


def translator(request: Request) -> Translator:
    return Translator(chat_service(request), conversation_store(request))


def fresh_wanted(request: Request) -> bool:
    """``Cache-Control: no-cache``: the client wants an answer computed now."""
    return "no-cache" in request.headers.get("cache-control", "").lower()


Chatter = Annotated[Caller, Depends(calling("chat"))]
Chat = Annotated[ChatService, Depends(chat_service)]
Conversations = Annotated[ConversationStore, Depends(conversation_store)]
Translate = Annotated[Translator, Depends(translator)]

router = APIRouter(tags=["chat"])


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


async def opened(chat: ChatService, job: Job, request: Request, slot: StreamSlot | None = None) -> Answering:
    """The job's session; a stream's ``slot`` is given back when none opens. A client
    gone before its turn raises ClientGone, answered 499 (``client_gone``)."""
    try:
        return await chat.open(job, lambda: until_disconnected(request))
    except BaseException:
        if slot is not None:
            await slot.close()
        raise


def remembering(conversations: ConversationStore, job: Job) -> Callable[[str], Awaitable[None]]:
    """Appends the turn and its answer to the job's conversation, if it has one."""

    async def remember(answer: str) -> None:
        if job.conversation is not None:
            await conversations.append(job.conversation, [*job.messages, {"role": "assistant", "content": answer}])

    return remember


@router.get("/v1/models", dependencies=[Depends(signed_in("chat"))], response_model=ModelList)
async def models(chat: Chat) -> ModelList:
    return chat.model_list()


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(signed_in("chat"))], response_model=ModelCard)
async def model(model_id: str, chat: Chat) -> ModelCard:
    return found_model(chat.model_list(), model_id)


@router.post(
    "/v1/chat/completions",
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
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    caller: Chatter,
    chat: Chat,
    conversations: Conversations,
    translate: Translate,
) -> Response | ChatCompletion:
    job, tools = await translate.completion(body, caller, fresh_wanted(request))
    jobs = translate.choices(job, body.n)
    slot = await stream_slot(request) if body.stream else None
    sessions: list[Answering] = []
    try:
        for each in jobs:
            sessions.append(await opened(chat, each, request))
    except BaseException:
        await close_all(sessions, client_gone=False)
        if slot is not None:
            await slot.close()
        raise
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    remember = remembering(conversations, job)
    if slot is not None:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = openai_frames(
            sessions, completion_id, created, chat.model_id, include_usage, remember, tools.active, bool(body.logprobs)
        )
        return marked(closing(frames, sessions, slot), sessions[0])
    results = await whole_choices(sessions, lambda: until_disconnected(request))
    await remember(results[0].text)
    marked(response, sessions[0])
    done = results[0].done
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=chat.model_id,
        choices=[chosen(i, r, tools.active, bool(body.logprobs)) for i, r in enumerate(results)],
        usage=Usage(**usage_of([r.done for r in results])),
        sources=done.sources,
        baton=BatonExtras(**extras(done)),
    )


def chosen(index: int, result: Whole, tooling: bool, logprobs: bool) -> Choice:
    """One choice of a whole answer: its text, or the tool calls it made."""
    calls = parse_calls(result.text) if tooling else None
    message = (
        AssistantMessage(content=None, tool_calls=[ToolCallOut(**c.public()) for c in calls])
        if calls
        else AssistantMessage(content=result.text)
    )
    return Choice(
        index=index,
        message=message,
        finish_reason="tool_calls" if calls else result.done.finish_reason,
        logprobs=ChoiceLogprobs(**logprobs_out(result.logprobs)) if logprobs else None,
    )


@router.post("/chat", response_model=SeedChatResponse)
async def seed_chat(
    body: SeedChatRequest,
    request: Request,
    response: Response,
    caller: Chatter,
    chat: Chat,
    conversations: Conversations,
    translate: Translate,
) -> Response | SeedChatResponse:
    job = await translate.seed(body, caller, fresh_wanted(request))
    session = await opened(chat, job, request)
    text, done = await answer_whole(session, request)
    await remembering(conversations, job)(text)
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


@router.post("/chat/stream", response_model=None, responses=answers("text/event-stream", events=SeedChatChunk))
async def seed_chat_stream(
    body: SeedChatRequest,
    request: Request,
    caller: Chatter,
    chat: Chat,
    conversations: Conversations,
    translate: Translate,
) -> Response:
    job = await translate.seed(body, caller, fresh_wanted(request))
    slot = await stream_slot(request)
    session = await opened(chat, job, request, slot)
    return marked(closing(seed_frames(session, remembering(conversations, job)), session, slot), session)


@router.post("/v1/conversations", status_code=201, response_model=ConversationCard)
async def create_conversation(body: ConversationCreate, caller: Chatter, store: Conversations) -> dict[str, Any]:
    return (await store.create(caller.subject, body.title)).public(with_messages=False)


@router.get("/v1/conversations", response_model=ConversationList)
async def list_conversations(caller: Chatter, store: Conversations) -> dict[str, Any]:
    return {"data": [c.public(with_messages=False) for c in await store.owned(caller.subject)]}


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationView)
async def get_conversation(conversation_id: str, caller: Chatter, store: Conversations) -> dict[str, Any]:
    return (await store.get(caller.subject, conversation_id)).public()


@router.delete("/v1/conversations/{conversation_id}", status_code=204)
async def delete_conversation(conversation_id: str, caller: Chatter, store: Conversations) -> Response:
    await store.delete(caller.subject, conversation_id)
    return Response(status_code=204)
