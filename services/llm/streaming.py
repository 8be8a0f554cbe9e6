"""An answer as server-sent events: OpenAI's chat completion chunks (a tool call held
until it is whole, then sent as ``tool_calls`` deltas) and the seed's token events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Response

from services.llm.answer import Done
from services.llm.chat import Answering
from services.llm.engine import TokenLogprob
from services.llm.schemas import logprobs_out
from services.llm.tools import parse_calls
from shared.limits import StreamSlot
from shared.sse import DONE, ClosingStream, frame

Remember = Callable[[str], Awaitable[None]]


def extras(done: Done) -> dict[str, Any]:
    """Baton's own fields of an answer (``baton``)."""
    return {
        "device": done.device,
        "gpu_wait_time": done.gpu_wait_time,
        "inference_time": done.inference_time,
        "rag_context_used": done.rag_context_used,
        "warnings": done.warnings,
    }


def openai_frames(
    session: Answering,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    remember: Remember,
    tooling: bool = False,
    logprobs: bool = False,
) -> AsyncIterator[str]:
    """Content as it comes; with tools, an answer that opens with ``{`` is a call: held
    until it is whole, then sent as ``tool_calls`` deltas, one per call. ``logprobs``:
    each chunk carries its tokens' log-probabilities."""
    taken: list[TokenLogprob] = []

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        shown = None
        if logprobs and "role" not in delta and finish is None:
            taken.extend(session.logprobs())
            shown = logprobs_out(taken)
            taken.clear()
        return frame(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": shown}],
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
            elif logprobs:
                taken.extend(session.logprobs())  # the held call's, sent with it
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
        yield chunk({}, finish, sources=done.sources, baton=extras(done))
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


async def seed_frames(session: Answering, remember: Remember) -> AsyncIterator[str]:
    """The seed's ``/chat/stream``: a token per event, then one that says it is done."""
    pieces = []
    async for piece in session.tokens():
        pieces.append(piece)
        yield frame({"token": piece, "done": False})
    done = session.result
    await remember("".join(pieces))
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


def closing(frames: AsyncIterator[str], session: Answering, slot: StreamSlot) -> Response:
    """The session is closed however the stream ends (the client gone unless it
    finished), and the user's stream slot given back."""

    async def close(finished: bool) -> None:
        try:
            await session.close(client_gone=not finished)
        finally:
            await slot.close()

    return ClosingStream(frames, close)
