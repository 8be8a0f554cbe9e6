"""Transcription's error table: a GPU not granted is the same 503 before a stream starts
and the same error event after (in process, on a bare app with the service's table)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from services.transcription.errors import ERRORS
from shared.errors import install_error_handlers, map_errors
from shared.gpu import GpuUnavailable
from shared.sse import ClosingStream, frame


def app() -> FastAPI:
    made = FastAPI()
    install_error_handlers(made)
    map_errors(made, ERRORS)

    @made.get("/plain")
    async def plain() -> None:
        raise GpuUnavailable("no", retry_after_s=3, reason="wait_over")

    @made.get("/stream")
    async def stream() -> ClosingStream:
        async def frames() -> AsyncIterator[str]:
            yield frame({"delta": "Hello"})
            raise GpuUnavailable("no", retry_after_s=3, reason="wait_over")

        async def close(_: bool) -> None:
            return None

        return ClosingStream(frames(), close, ERRORS)

    return made


async def test_not_granted_is_one_answer_before_and_after_a_stream_starts() -> None:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        plain = await http.get("/plain")
        streamed = await http.get("/stream")
    assert plain.status_code == 503 and plain.headers["retry-after"] == "3"
    assert plain.json()["error"]["code"] == "gpu_unavailable"
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[1]) == plain.json()
    assert events[-1] == "[DONE]"
