"""The job runner's checkpoints, in process: a real Redis store, and a scripted worker in
place of faster-whisper (which windows are decoded from where is the point here, not the
model; the process-level tests run the real one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
from redis.asyncio import Redis

from harness.servers import RedisServer
from services.transcription import audio
from services.transcription.jobs import FINAL, JobMetrics, JobRunner, JobStore
from services.transcription.placement import Placement
from services.transcription.settings import TranscriptionSettings
from services.transcription.whisper import Piece, Window, total_frames
from services.transcription.worker import Work
from shared.client import ServiceClient
from shared.events import Subscription
from shared.metrics import Metrics

WINDOW = 3000
"""Frames per decode window (30 s), as faster-whisper's."""
SAMPLES = np.zeros(95 * audio.SAMPLE_RATE, dtype=np.float32)
"""95 s: windows from 0, 3000, 6000 and 9000."""


class ScriptedPlacement:
    """Decodes two segments per window from the seek it is asked for; with ``die_after``
    it stops for ever after that many windows, as a killed process would."""

    def __init__(self, die_after: int | None = None) -> None:
        self.asked: list[dict[str, Any]] = []
        self.die_after = die_after
        self.dead = asyncio.Event()

    async def run(self, request_for: Callable[[], Work], *, on_message: Any, **_: Any) -> dict[str, Any]:
        work = request_for()
        assert work.op == "windows" and work.options is not None and work.samples is not None
        seek, next_id = work.options["seek"], work.options["first_id"]
        self.asked.append({"seek": seek, "first_id": next_id})
        total, windows = total_frames(work.samples), 0
        while seek < total:
            if windows == self.die_after:
                self.dead.set()
                await asyncio.Event().wait()
            end = min(total, seek + WINDOW)
            pieces = [Piece(next_id + i, seek, seek / 100 + i, seek / 100 + i + 1, f" w{seek}.{i}") for i in range(2)]
            await on_message("window", Window(seek, pieces, end))
            seek, next_id, windows = end, next_id + 2, windows + 1
        return {}


class Decoder:
    """The job's file, decoded: the samples above."""

    async def load(self, _: Path, *__: Any) -> tuple[np.ndarray, audio.Held]:
        return SAMPLES, audio.Held(audio.MemoryBudget(1 << 30), 0)


class Rag:
    """Takes every transcript at once."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def request(self, method: str, path: str, *, json: dict[str, Any], **_: Any) -> httpx.Response:
        assert (method, path) == ("POST", "/v1/segments")
        self.bodies.append(json)
        return httpx.Response(200, json={})


@pytest.fixture
async def store(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[JobStore]:
    redis = Redis.from_url(redis_server.url)
    yield JobStore(redis, key_prefix)
    await redis.aclose()


def runner(store: JobStore, placement: ScriptedPlacement, rag: Rag) -> JobRunner:
    return JobRunner(
        store,
        cast(Placement, placement),
        cast(ServiceClient, rag),
        TranscriptionSettings.model_construct(index_retry_max_s=1.0),
        JobMetrics(Metrics("transcription")),
        cast(audio.Decoder, Decoder()),
    )


async def finished(queue: Subscription) -> dict[str, Any]:
    """A job's events until it is indexed; its ``done`` event."""
    last: dict[str, Any] = {}
    while (event := await asyncio.wait_for(queue.get(), 60)) is not None:
        if event["type"] == "done":
            last = event
        if event["type"] == "indexed":
            return last
    raise AssertionError("the subscription ended")


async def test_a_job_resumes_from_its_last_stored_window_without_gaps_or_repeats(store: JobStore) -> None:
    # Uninterrupted, for reference.
    rag = Rag()
    whole = runner(store, ScriptedPlacement(), rag)
    await whole.start()
    async with whole.events.subscribe("job-whole") as events:
        await whole.submit("job-whole", "alice", Path("/nonexistent"), "m.wav", 95.0, None, None, None)
        reference = await finished(events)
    await whole.stop()
    assert len(rag.bodies[0]["segments"]) == 8

    # Killed after two windows...
    dying = ScriptedPlacement(die_after=2)
    first = runner(store, dying, Rag())
    await first.start()
    await first.submit("job-1", "alice", Path("/nonexistent"), "m.wav", 95.0, None, None, None)
    await asyncio.wait_for(dying.dead.wait(), 60)
    await first.stop()
    stored = await store.get("job-1")
    assert stored is not None and stored.state not in FINAL
    assert (stored.seek, len(stored.segments)) == (2 * WINDOW, 4)

    # ...and a new process goes on from the checkpoint, not from the start.
    resumed = ScriptedPlacement()
    rag = Rag()
    second = runner(store, resumed, rag)
    async with second.events.subscribe("job-1") as events:
        await second.start()
        done = await finished(events)
    await second.stop()
    assert resumed.asked == [{"seek": 2 * WINDOW, "first_id": 4}]
    job = await store.get("job-1")
    assert job is not None and job.state == "done" and job.indexed
    assert [s["id"] for s in job.segments] == list(range(8))
    assert [s["seek"] for s in job.segments] == [0, 0, 3000, 3000, 6000, 6000, 9000, 9000]
    assert done["text"] == reference["text"] == job.text
    assert [s["text"] for s in rag.bodies[0]["segments"]] == [s["text"].strip() for s in job.segments]
