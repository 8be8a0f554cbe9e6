"""The transcription service's parts, built from its settings: ``build(settings)``. The
app (app.py) is made from them, so a test can build the parts with a stand-in for the
card or for the index and serve them in-process."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
from redis.asyncio import Redis

from services.transcription import audio
from services.transcription.jobs import JobMetrics, JobRunner, JobStore
from services.transcription.placement import Placement, PlacementMetrics
from services.transcription.pool import WorkerPool
from services.transcription.settings import TranscriptionSettings
from services.transcription.speakers.voices import Voices
from services.transcription.transcriber import Transcriber
from services.transcription.worker import WorkerSpec
from shared.client import ServiceClient
from shared.gpu import Gpu, vram_estimate_mb
from shared.presets import UnknownModel, resolve
from shared.protocol.models import created_at
from shared.service import Foundation, model
from shared.settings import load_settings
from shared.store import open_redis

SERVICE_SCOPES = ("gpu", "rag:write")
UNAVAILABLE = "speaker diarization is not installed on this service; its log says what is missing"
log = logging.getLogger(__name__)


@dataclass
class Parts:
    settings: TranscriptionSettings
    base: Foundation
    model_id: str
    model_path: Path
    vram_mb: int
    redis: Redis
    gpu: Gpu
    rag: ServiceClient
    pool: WorkerPool
    placement: Placement
    decoder: audio.Decoder
    runner: JobRunner
    transcriber: Transcriber
    voices: Voices

    async def start(self) -> None:
        await self.pool.start()  # on the event loop's thread: see worker.Worker
        await self.runner.start()

    async def close(self) -> None:
        await self.runner.stop()
        await self.pool.close()
        self.decoder.close()
        await self.gpu.aclose()
        await self.rag.aclose()
        await self.redis.aclose()
        await self.base.guards.aclose()


def speaker_model(name_or_path: str) -> tuple[Path | None, str | None]:
    """The speaker model's folder, or why diarization is not offered (a service without
    it still transcribes: TRANSCRIPTION_SPEAKER_MODEL names it)."""
    if importlib.util.find_spec("torch") is None:
        log.warning("no speaker diarization: torch is not installed (pip install 'baton[speakers]')")
        return None, UNAVAILABLE
    try:
        path, _ = resolve(name_or_path, "speaker")
    except UnknownModel as exc:
        log.warning("no speaker diarization", extra={"reason": f"TRANSCRIPTION_SPEAKER_MODEL: {exc}"})
        return None, UNAVAILABLE
    return path, None


def build(
    settings: TranscriptionSettings | None = None,
    *,
    gpu: Gpu | None = None,
    rag_transport: httpx.AsyncBaseTransport | None = None,
) -> Parts:
    """Every part, nothing started: worker processes start with ``Parts.start``. ``gpu``:
    a stand-in for the coordinator's client; ``rag_transport``: for the RAG service's."""
    settings = settings or load_settings(TranscriptionSettings)
    base = Foundation.build("transcription", settings, calls_with=SERVICE_SCOPES)
    path, preset = model(settings.model, "whisper", "TRANSCRIPTION_MODEL")
    model_id = preset.name if preset else path.name
    speaker_path, no_speakers = speaker_model(settings.speaker_model)
    spec = WorkerSpec(
        path,
        device=settings.device,
        compute_type=settings.compute_type,
        threads=settings.threads,
        beam_size=settings.beam_size,
        chunk_length_s=settings.chunk_length_s,
        nice=settings.worker_nice,
        speaker_model=speaker_path,
        speaker_same=settings.speaker_same,
        speaker_match=settings.speaker_match,
    )
    weights = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    vram_mb = settings.vram_mb if settings.vram_mb is not None else vram_estimate_mb(weights, settings.workers)
    redis = open_redis(settings.redis_url, 5)
    gpu = gpu or base.gpu(settings)
    rag = ServiceClient(settings.rag_url, base.tokens, retries=0, transport=rag_transport)
    pool = WorkerPool(spec, settings.workers)
    placement = Placement(
        pool,
        gpu,
        vram_mb=vram_mb,
        ttl_ms=settings.lease_ttl_ms,
        on_cuda=settings.device != "cpu",
        metrics=PlacementMetrics(base.metrics),
        stall_s=settings.stall_s,
        on_stall=lambda fields: base.guards.audit.write("worker_stalled", **fields),
    )
    decoder = audio.Decoder(settings.worker_nice, audio.MemoryBudget(int(settings.decode_budget_mb * 1_048_576)))
    store = JobStore(redis, settings.key_prefix)
    runner = JobRunner(store, placement, rag, settings, JobMetrics(base.metrics), decoder, base.guards.limiter)
    transcriber = Transcriber(placement, decoder, settings, model_id, base.metrics, created_at(path), no_speakers)
    voices = Voices(redis, settings.key_prefix)
    return Parts(
        settings, base, model_id, path, vram_mb, redis, gpu, rag, pool, placement, decoder, runner, transcriber, voices
    )
