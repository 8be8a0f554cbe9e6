"""``POST /v1/completions``: each prompt a session of its own in the batch, the answers
read together as the response's choices (services/llm/chat/choices.py)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request, Response

from services.llm.chat.answer import Answer
from services.llm.chat.choices import Ended, close_all, merged, whole_choices
from services.llm.chat.job import Job
from services.llm.chat.routes import Chat, Chatter, opened
from services.llm.chat.schemas import Usage
from services.llm.chat.service import ChatService
from services.llm.chat.streaming import closing
from services.llm.chat.translate import check_tokens
from services.llm.completions.schemas import (
    DEFAULT_MAX_TOKENS,
    MAX_PROMPTS,
    Completion,
    CompletionChoice,
    CompletionRequest,
    LegacyLogprobs,
)
from services.llm.engine import Params, Prompt, TokenLogprob
from shared.errors import BadRequest
from shared.openapi import answers
from shared.sse import DONE, frame
from shared.web import Caller, stream_slot, until_disconnected

router = APIRouter(tags=["completions"])


def jobs(body: CompletionRequest, chat: ChatService, caller: Caller) -> list[Job]:
    """``n`` jobs per prompt (choice ``i * n + j`` is prompt i's j-th), every bound
    checked before any work; the choices of one prompt read it once (a group)."""
    chat.check_model(body.model)
    prompts = body.prompts()
    if not prompts:
        raise BadRequest("prompt must not be an empty list", param="prompt")
    if len(prompts) * body.n > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} choices per request (prompts times n)", param="prompt")
    engine = chat.engine
    max_tokens = chat.max_tokens(body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS)
    params = Params(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stops(),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias={int(k): float(v) for k, v in (body.logit_bias or {}).items()},
        logprobs=body.logprobs,
    )
    check_tokens(params.logit_bias, engine.n_vocab)
    made = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if len(prompt) > engine.max_prompt_chars:
                raise BadRequest(
                    f"the prompt holds {len(prompt)} characters, more than this model's context of "
                    f"{engine.n_ctx} tokens can hold",
                    param="prompt",
                    code="context_length_exceeded",
                )
            tokens = engine.vocabulary.raw(prompt)
        else:
            if any(t < 0 or t >= engine.n_vocab for t in prompt):
                raise BadRequest(f"token ids are 0 to {engine.n_vocab - 1} for this model", param="prompt")
            tokens = list(prompt)
        if not tokens:
            raise BadRequest("the prompt is empty", param="prompt")
        group = secrets.token_hex(8) if body.n > 1 else None
        for index in range(body.n):
            seed = params.seed + index if params.seed is not None else None
            choice = Job(
                messages=[],
                params=replace(params, seed=seed),
                model=body.model,
                raw=Prompt(tokens, []),
                subject=caller.subject,
                use_cache=False,
                group=group,
            )
            made.append(choice)
    return made


def spelled(chat: ChatService, prompt: str | list[int]) -> str:
    """What ``echo`` repeats: the prompt as text."""
    if isinstance(prompt, str):
        return prompt
    return chat.engine.vocabulary.text(prompt)


def legacy(entries: list[TokenLogprob], offset: int) -> LegacyLogprobs:
    """OpenAI's legacy logprobs: tokens, theirs, the likeliest at each place, where each starts."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return LegacyLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{c.token: c.logprob for c in e.top} for e in entries],
        text_offset=offsets,
    )


@router.post(
    "/v1/completions",
    response_model=None,
    responses=answers(
        "application/json",
        "text/event-stream",
        description="A completion, or its stream",
        json=Completion,
        events=Completion,
    ),
)
async def completions(body: CompletionRequest, request: Request, caller: Chatter, chat: Chat) -> Response | Completion:
    made = jobs(body, chat, caller)
    slot = await stream_slot(request) if body.stream else None
    sessions: list[Answer] = []
    try:
        for job in made:
            sessions.append(await opened(chat, job, request))
    except BaseException:
        await close_all(sessions, client_gone=False)
        if slot is not None:
            await slot.close()
        raise
    echoes = [spelled(chat, p) if body.echo else "" for p in body.prompts() for _ in range(body.n)]
    completion_id = f"cmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    if slot is not None:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = frames(sessions, echoes, completion_id, created, chat.model_id, include_usage, body)
        return closing(events, sessions, slot)
    results = await whole_choices(sessions, lambda: until_disconnected(request))
    choices = [
        CompletionChoice(
            index=i,
            text=echoes[i] + r.text,
            logprobs=legacy(r.logprobs, len(echoes[i])) if body.logprobs is not None else None,
            finish_reason=r.done.finish_reason,
        )
        for i, r in enumerate(results)
    ]
    prompt_tokens = sum(r.done.prompt_tokens for r in results)
    completion_tokens = sum(r.done.completion_tokens for r in results)
    return Completion(
        id=completion_id,
        created=created,
        model=chat.model_id,
        choices=choices,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def frames(
    sessions: list[Answer],
    echoes: list[str],
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    body: CompletionRequest,
) -> AsyncIterator[str]:
    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        shown = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
        return frame(shown | {"choices": choices} | extra)

    offsets = [len(e) for e in echoes]
    for index, echo in enumerate(echoes):
        if echo:
            yield event([{"index": index, "text": echo, "logprobs": None, "finish_reason": None}])
    prompt_tokens = completion_tokens = 0
    async for item in merged(sessions):
        if isinstance(item, Ended):
            prompt_tokens += item.done.prompt_tokens
            completion_tokens += item.done.completion_tokens
            yield event([{"index": item.index, "text": "", "logprobs": None, "finish_reason": item.done.finish_reason}])
            continue
        logprobs = None
        if body.logprobs is not None:
            logprobs = legacy(item.logprobs, offsets[item.index]).model_dump()
        offsets[item.index] += len(item.text)
        yield event([{"index": item.index, "text": item.text, "logprobs": logprobs, "finish_reason": None}])
    if include_usage:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        yield event([], usage=usage | {"total_tokens": prompt_tokens + completion_tokens})
    yield DONE
