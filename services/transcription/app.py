"""The transcription app: ``create_app(settings)``; nothing is created at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from redis.exceptions import RedisError

from services.transcription import audio
from services.transcription.api import build_router
from services.transcription.errors import ERRORS
from services.transcription.jobs import JobMetrics, JobRunner, JobStore
from services.transcription.placement import Placement, PlacementMetrics
from services.transcription.pool import WorkerPool
from services.transcription.settings import TranscriptionSettings
from services.transcription.whisper import LANGUAGES
from services.transcription.worker import WorkerSpec
from shared.client import ServiceClient
from shared.errors import map_errors
from shared.gpu import vram_estimate_mb
from shared.service import Foundation, model
from shared.settings import load_settings
from shared.store import open_redis
from shared.web import Readiness

log = logging.getLogger(__name__)

SERVICE_SCOPES = ("gpu", "rag:write")
UPLOAD_OVERHEAD_MB = 1.0
"""Room for the multipart fields around the file in the body-size limit."""


def create_app(settings: TranscriptionSettings | None = None) -> FastAPI:
    settings = settings or load_settings(TranscriptionSettings)
    base = Foundation.build("transcription", settings, calls_with=SERVICE_SCOPES)
    guards, auth, metrics = base.guards, base.auth, base.metrics
    path, preset = model(settings.model, "whisper", "TRANSCRIPTION_MODEL")
    model_id = preset.name if preset else path.name
    spec = WorkerSpec(
        path,
        device=settings.device,
        compute_type=settings.compute_type,
        threads=settings.threads,
        beam_size=settings.beam_size,
        chunk_length_s=settings.chunk_length_s,
        nice=settings.worker_nice,
    )
    weights = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    vram_mb = settings.vram_mb if settings.vram_mb is not None else vram_estimate_mb(weights, settings.workers)
    redis = open_redis(settings.redis_url, 5)
    gpu = base.gpu(settings)
    rag = ServiceClient(settings.rag_url, base.tokens, retries=0)
    pool = WorkerPool(spec, settings.workers)
    placement = Placement(
        pool,
        gpu,
        vram_mb=vram_mb,
        ttl_ms=settings.lease_ttl_ms,
        on_cuda=settings.device != "cpu",
        metrics=PlacementMetrics(metrics),
        stall_s=settings.stall_s,
        on_stall=lambda fields: guards.audit.write("worker_stalled", **fields),
    )
    decoder = audio.Decoder(settings.worker_nice, audio.MemoryBudget(int(settings.decode_budget_mb * 1_048_576)))
    runner = JobRunner(
        JobStore(redis, settings.key_prefix), placement, rag, settings, JobMetrics(metrics), decoder, guards.limiter
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()  # on the event loop's thread: see worker.Worker
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()
            await pool.close()
            decoder.close()
            await gpu.aclose()
            await rag.aclose()
            await redis.aclose()
            await guards.aclose()

    async def ready() -> Readiness:
        try:
            ok = bool(await redis.ping())
        except (RedisError, OSError):
            ok = False
        return Readiness(ok, {"redis": "ok" if ok else "unreachable", "model": model_id})

    def public_info() -> dict[str, Any]:
        return {
            "model": model_id,
            "limits": {"max_upload_mb": settings.max_upload_mb, "max_duration_s": settings.max_duration_s}
            | settings.limits.public(),
        }

    def info() -> dict[str, Any]:
        return {
            "model_path": str(path),
            "device": settings.device,
            "compute_type": settings.compute_type,
            "beam_size": settings.beam_size,
            "chunk_length_s": settings.chunk_length_s,
            "workers": settings.workers,
            "vram_mb": vram_mb,
            "frees_memory_with": "checkpoint" if placement.checkpoints else "restart",
        }

    max_body_mb = settings.max_upload_mb + UPLOAD_OVERHEAD_MB
    app = base.app(max_body_mb, lifespan=lifespan, ready=ready, info=info, public_info=public_info)

    map_errors(app, ERRORS)
    app.include_router(build_router(placement, runner, decoder, settings, model_id, auth, metrics))

    def languages_in_schema(document: dict[str, Any]) -> None:
        """The document lists the languages this model transcribes ("" or none: detect)."""
        codes = sorted(LANGUAGES) if placement.pool.info.get("multilingual") else ["en"]
        for schema in document.get("components", {}).get("schemas", {}).values():
            language = schema.get("properties", {}).get("language")
            if language is not None and language.get("type") == "string":
                language["enum"] = ["", *codes]

    app.state.openapi_refinements = [languages_in_schema]
    return app
