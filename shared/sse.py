"""Server-sent events: a response type, and the rule for failures mid-stream.

Once a stream has started, its status is already 200: a failure is sent as an
error event in the usual envelope, followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from shared.errors import ErrorTable, as_api_error, envelope, internal_message

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
NO_ERRORS: ErrorTable = {}


def frame(data: dict[str, Any] | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n"


def error_frames(exc: BaseException, errors: ErrorTable = NO_ERRORS) -> list[str]:
    answered = as_api_error(exc, errors)
    if answered is not None:
        body = answered.body()
    elif isinstance(exc, RedisError):
        body = envelope(
            "the service's store is unavailable; try again shortly",
            "service_unavailable_error",
            code="store_unavailable",
        )
    else:
        body = envelope(internal_message(), "server_error", code="internal_error")
    return [frame(body), DONE]


async def guarded(frames: AsyncIterator[str], errors: ErrorTable = NO_ERRORS) -> AsyncIterator[str]:
    """Pass frames through; turn a failure into an error event and [DONE] (a domain
    error as the service's ``errors`` table answers it)."""
    try:
        async for item in frames:
            yield item
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, RedisError):
            log.warning("store unavailable mid-stream", extra={"error": type(exc).__name__})
        elif as_api_error(exc, errors) is None:
            log.error("stream failed after it started", exc_info=exc)
        for item in error_frames(exc, errors):
            yield item


class ClosingStream(StreamingResponse):
    """An SSE response that always runs ``on_close``, even when the client left before
    the first byte (a generator's ``finally`` never runs for a stream never started).
    ``on_close`` gets whether the stream ran to its end."""

    def __init__(
        self,
        frames: AsyncIterator[str],
        on_close: Callable[[bool], Awaitable[None]],
        errors: ErrorTable = NO_ERRORS,
    ) -> None:
        self._finished = False
        super().__init__(
            guarded(self._track(frames), errors),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def _track(self, frames: AsyncIterator[str]) -> AsyncIterator[str]:
        async for item in frames:
            yield item
        self._finished = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._on_close(self._finished))


def sse_response(frames: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        guarded(frames),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
