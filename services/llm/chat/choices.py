"""Several answers as one response's choices: the prompts of a completion request, each
its own session in the batch, read together. ``whole_choices`` waits for them all;
``merged`` yields their pieces as they come, tagged with the choice's index."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.llm.chat.answer import Answer, ClientGone, Done, whole
from services.llm.engine import TokenLogprob


@dataclass
class Whole:
    text: str
    done: Done
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def whole_choices(answers: Sequence[Answer], gone: Callable[[], Awaitable[None]]) -> list[Whole]:
    """Every answer whole, in order; each closed either way (ClientGone if the client left)."""

    async def one(answer: Answer) -> Whole:
        text, done = await whole(answer, gone)
        return Whole(text, done, answer.logprobs())

    tasks = [asyncio.ensure_future(one(a)) for a in answers]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        for answer in answers:
            with contextlib.suppress(Exception):
                await answer.close(client_gone=True)
        raise


@dataclass
class Piece:
    index: int
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Ended:
    index: int
    done: Done


async def merged(answers: Sequence[Answer]) -> AsyncIterator[Piece | Ended]:
    """The answers' pieces as they come, then each one's end. The caller closes the
    answers (``closing``); leaving early stops the readers."""
    queue: asyncio.Queue[Piece | Ended | BaseException] = asyncio.Queue()

    async def read(index: int, answer: Answer) -> None:
        try:
            async for text in answer.tokens():
                queue.put_nowait(Piece(index, text, answer.logprobs()))
            queue.put_nowait(Ended(index, answer.result))
        except BaseException as exc:
            queue.put_nowait(exc)
            raise

    readers = [asyncio.ensure_future(read(i, a)) for i, a in enumerate(answers)]
    try:
        ended = 0
        while ended < len(answers):
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Ended):
                ended += 1
            yield item
    finally:
        for reader in readers:
            reader.cancel()
        for reader in readers:
            with contextlib.suppress(BaseException):
                await reader


async def close_all(answers: Sequence[Answer], *, client_gone: bool) -> None:
    for answer in answers:
        with contextlib.suppress(ClientGone):
            await answer.close(client_gone=client_gone)
