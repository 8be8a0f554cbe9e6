"""A request's body, its caller and its headers into one validated ``Job``: the tools and
tool_choice, the sampling parameters, whose it is and what it may reveal, the stored
conversation it continues, and whether the response cache may answer it. Everything a
request can be refused for before any work is checked here or in ``ChatService.check``."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from pydantic import BaseModel

from services.llm.chat.job import Job
from services.llm.chat.schemas import (
    ChatCompletionRequest,
    RagOptions,
    SchemaFormat,
    SeedChatRequest,
    prompt_messages,
)
from services.llm.chat.service import ChatService
from services.llm.conversations.store import ConversationStore
from services.llm.engine import Params
from services.llm.engine.grammar import GrammarLimits
from services.llm.tools.calls import BadTool, Tool, chosen, grammar, parse_tools, with_tools
from shared.errors import BadRequest
from shared.web import Caller


@dataclass(frozen=True)
class Calling:
    """What a request's tools ask of the answer."""

    tools: list[Tool]
    """Those described to the model (none with tool_choice none)."""
    grammar: str | None

    @property
    def active(self) -> bool:
        return bool(self.tools)


class Translator:
    def __init__(self, chat: ChatService, conversations: ConversationStore) -> None:
        self.chat = chat
        self.conversations = conversations

    async def completion(self, body: ChatCompletionRequest, caller: Caller, fresh: bool) -> tuple[Job, Calling]:
        """OpenAI's chat completion request; ``fresh``: the client asked for no cached answer."""
        chat = self.chat
        chat.check_model(body.model)
        calling = tooling(body, chat.engine.grammar_limits, chat.settings.max_tools)
        params = sampling(body, chat.max_tokens(body.max_completion_tokens or body.max_tokens, also=body.max_tokens))
        params.grammar = calling.grammar
        check_tokens(params.logit_bias, chat.engine.n_vocab)
        job = Job(
            messages=with_tools(prompt_messages(body.messages), calling.tools),
            params=params,
            rag=body.rag,
            model=body.model,
            route=body.route,
        )
        return await self._owned(job, caller, body.conversation, fresh), calling

    def choices(self, job: Job, n: int) -> list[Job]:
        """``n`` jobs for ``n`` choices: the same prompt (read once: a group), each with its
        own seed when the request gives one, so that sampled choices differ."""
        if n == 1:
            return [job]
        if job.conversation is not None:
            raise BadRequest("n above 1 cannot continue a conversation: it stores one answer", param="n")
        group = secrets.token_hex(8)
        made = []
        for index in range(n):
            seed = job.params.seed + index if job.params.seed is not None else None
            made.append(replace(job, params=replace(job.params, seed=seed), group=group))
        return made

    async def seed(self, body: SeedChatRequest, caller: Caller, fresh: bool) -> Job:
        """The seed's ``/chat`` and ``/chat/stream`` request."""
        job = Job(
            messages=prompt_messages(body.messages),
            params=Params(max_tokens=self.chat.max_tokens(body.max_tokens), temperature=body.temperature),
            rag=RagOptions(top_k=body.rag_top_k) if body.use_rag else None,
            context=body.context,
        )
        return await self._owned(job, caller, body.conversation_id, fresh)

    async def _owned(self, job: Job, caller: Caller, conversation_id: str | None, fresh: bool) -> Job:
        job.subject = caller.subject
        job.reveal = caller.admin or "rag:read" in caller.scopes
        job.use_cache = not fresh
        if conversation_id is not None:
            # The caller's own (404 otherwise), with room for the turn and its answer.
            conversation = await self.conversations.get(job.subject, conversation_id)
            await self.conversations.check_room(conversation, job.messages)
            job.conversation = conversation
        return job


def sampling(body: ChatCompletionRequest, max_tokens: int) -> Params:
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
        logit_bias=body.token_biases(),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        json_schema=schema,
        json_object=fmt is not None and fmt.type == "json_object",
    )


def check_tokens(biases: dict[int, float], n_vocab: int) -> None:
    """Every biased token is one of the model's (400 naming the first that is not)."""
    for token in biases:
        if token >= n_vocab:
            raise BadRequest(
                f"logit_bias names token {token}; this model's tokens are 0 to {n_vocab - 1}",
                param="logit_bias",
                code="invalid_value",
            )


def tooling(body: ChatCompletionRequest, limits: GrammarLimits, max_tools: int) -> Calling:
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
