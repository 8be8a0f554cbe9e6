"""An answer as server-sent events: OpenAI's chat completion chunks (a tool call held
until it is whole, then sent as ``tool_calls`` deltas) and the seed's token events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Response

from services.llm.chat.answer import Answer, Done
from services.llm.chat.choices import Ended, close_all, merged
from services.llm.chat.schemas import logprobs_out
from services.llm.chat.service import Answering
from services.llm.engine import TokenLogprob
from services.llm.tools.calls import parse_calls
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


@dataclass
class _Choice:
    """One choice's stream: its text so far, whether it is (or may be) a held tool call,
    and the log-probabilities not sent yet."""

    undecided: bool
    held: bool = False
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def feed(self, piece: str) -> str | None:
        """What to send now of ``piece`` (None: held). With tools, an answer that opens with
        ``{`` is a call, held until it is whole."""
        self.pieces.append(piece)
        if self.undecided:
            started = "".join(self.pieces).lstrip()
            if not started:
                return None
            self.undecided, self.held = False, started.startswith("{")
            piece = "".join(self.pieces)
        return None if self.held else piece

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def openai_frames(
    sessions: Sequence[Answering],
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    remember: Remember,
    tooling: bool = False,
    logprobs: bool = False,
) -> AsyncIterator[str]:
    """Each choice's content as it comes (``n`` sessions, read together); with tools, an
    answer that opens with ``{`` is a call: held until it is whole, then sent as
    ``tool_calls`` deltas, one per call. ``logprobs``: each chunk carries its tokens'
    log-probabilities. The first choice's answer is remembered (a conversation has one)."""

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        shown = None
        if logprobs and "role" not in delta and finish is None:
            shown = logprobs_out(choices[index].logprobs)
            choices[index].logprobs = []
        return frame(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": shown}],
                **extra,
            }
        )

    choices = [_Choice(undecided=tooling) for _ in sessions]

    async def ending(index: int, done: Done) -> AsyncIterator[str]:
        choice = choices[index]
        if index == 0:
            await remember(choice.text)
        finish = done.finish_reason
        if choice.held or choice.undecided:
            calls = parse_calls(choice.text)
            if calls:
                for number, call in enumerate(calls):
                    yield chunk(index, {"tool_calls": [call.public(number)]})
                finish = "tool_calls"
            elif choice.text:
                yield chunk(index, {"content": choice.text})  # cut off by max_tokens before the call was whole
        yield chunk(index, {}, finish, sources=done.sources, baton=extras(done))

    async def frames() -> AsyncIterator[str]:
        for index in range(len(sessions)):
            yield chunk(index, {"role": "assistant", "content": ""})
        ended: list[Done] = []
        async for item in merged(sessions):
            if isinstance(item, Ended):
                ended.append(item.done)
                async for event in ending(item.index, item.done):
                    yield event
                continue
            choice = choices[item.index]
            choice.logprobs += item.logprobs
            shown = choice.feed(item.text)
            if shown is not None:
                yield chunk(item.index, {"content": shown})
        if include_usage:
            yield frame(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage_of(ended),
                }
            )
        yield DONE

    return frames()


def usage_of(ended: Sequence[Done]) -> dict[str, int]:
    """The usage of ``n`` choices: the prompt once (it is read once), every choice's tokens."""
    usage = ended[0].usage()
    written = sum(done.completion_tokens for done in ended)
    return usage | {"completion_tokens": written, "total_tokens": usage["prompt_tokens"] + written}


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


def closing(frames: AsyncIterator[str], sessions: Answering | Sequence[Answering], slot: StreamSlot) -> Response:
    """Every session is closed however the stream ends (the client gone unless it
    finished), and the user's stream slot given back."""
    every = [sessions] if isinstance(sessions, Answer) else list(sessions)

    async def close(finished: bool) -> None:
        try:
            await close_all(every, client_gone=not finished)
        finally:
            await slot.close()

    return ClosingStream(frames, close)
