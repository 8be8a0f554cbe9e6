"""What every answer shares, local, cached or remote: how it ended and who answered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.llm.engine.batch import TokenLogprob
from shared.aio import Interrupted, unless


@dataclass
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    sources: list[dict[str, Any]]
    rag_context_used: int
    gpu_wait_time: float
    inference_time: float
    device: str
    warnings: list[str]
    summarized_messages: int | None = None
    """In a conversation: how many of its messages the prompt carried as a summary."""
    cached_tokens: int = 0
    """Prompt tokens taken from the KV cache (a prefix reused) instead of read again."""

    def usage(self) -> dict[str, int]:
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.summarized_messages is not None:
            usage["summarized_messages"] = self.summarized_messages
        return usage


class Answer:
    """What every answer (Session, CachedSession, RemoteSession) shares: how it ended,
    who answered, and whether it holds the local model slot."""

    done: Done | None = None
    backend = "local"
    """Who answered: ``local`` or a backend's name (X-Baton-Backend)."""
    holds_slot = False
    cached = False
    """Whether the answer comes from the response cache."""

    @property
    def result(self) -> Done:
        """How the answer ended; only once ``tokens()`` has run to its end."""
        if self.done is None:
            raise RuntimeError("the answer has not finished")
        return self.done

    async def tokens(self) -> AsyncIterator[str]:
        """Text pieces as they come; ``done`` is set after the last."""
        raise NotImplementedError
        yield ""

    def logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of the tokens whose text came since the last call (an
        answer that was asked for them; the local model's only)."""
        return []

    async def close(self, *, client_gone: bool) -> None:
        raise NotImplementedError


class ClientGone(Exception):
    """The client disconnected before its turn: nothing to answer."""


async def whole(answer: Answer, gone: Callable[[], Awaitable[None]]) -> tuple[str, Done]:
    """The whole answer and how it ended, the answer closed either way; ClientGone (and
    the generation stopped within a token) if ``gone`` returns first."""

    async def gather() -> str:
        return "".join([piece async for piece in answer.tokens()])

    try:
        text = await unless(gather(), gone())
    except Interrupted:
        await answer.close(client_gone=True)
        raise ClientGone() from None
    except BaseException as error:
        await answer.close(client_gone=isinstance(error, ClientGone))
        raise
    await answer.close(client_gone=False)
    return text, answer.result
