"""The transcription app: ``create_app(parts)`` serves what ``build(settings)`` made
(parts.py); given settings, or nothing, it builds them first. Nothing is created at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from redis.exceptions import RedisError

from services.transcription import speaker_routes
from services.transcription.errors import ERRORS
from services.transcription.parts import Parts, build
from services.transcription.routes import router
from services.transcription.settings import TranscriptionSettings
from services.transcription.whisper import LANGUAGES
from shared.errors import map_errors
from shared.web import Readiness

log = logging.getLogger(__name__)

UPLOAD_OVERHEAD_MB = 1.0
"""Room for the multipart fields around the file in the body-size limit."""


def create_app(parts: Parts | TranscriptionSettings | None = None) -> FastAPI:
    if not isinstance(parts, Parts):
        parts = build(parts)
    made = parts
    settings = made.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await made.start()
        try:
            yield
        finally:
            await made.close()

    async def ready() -> Readiness:
        try:
            ok = bool(await made.redis.ping())
        except (RedisError, OSError):
            ok = False
        return Readiness(ok, {"redis": "ok" if ok else "unreachable", "model": made.model_id})

    def public_info() -> dict[str, Any]:
        return {
            "model": made.model_id,
            "limits": {"max_upload_mb": settings.max_upload_mb, "max_duration_s": settings.max_duration_s}
            | settings.limits.public(),
        }

    def info() -> dict[str, Any]:
        return {
            "model_path": str(made.model_path),
            "device": settings.device,
            "compute_type": settings.compute_type,
            "beam_size": settings.beam_size,
            "chunk_length_s": settings.chunk_length_s,
            "workers": settings.workers,
            "vram_mb": made.vram_mb,
            "frees_memory_with": "checkpoint" if made.placement.checkpoints else "restart",
        }

    max_body_mb = settings.max_upload_mb + UPLOAD_OVERHEAD_MB
    app = made.base.app(max_body_mb, lifespan=lifespan, ready=ready, info=info, public_info=public_info)
    app.state.parts = made
    map_errors(app, ERRORS)
    app.include_router(router)
    app.include_router(speaker_routes.router)

    def languages_in_schema(document: dict[str, Any]) -> None:
        """The document lists the languages this model transcribes ("" or none: detect)."""
        codes = sorted(LANGUAGES) if made.pool.info.get("multilingual") else ["en"]
        for schema in document.get("components", {}).get("schemas", {}).values():
            language = schema.get("properties", {}).get("language")
            if language is not None and language.get("type") == "string":
                language["enum"] = ["", *codes]

    app.state.openapi_refinements = [languages_in_schema]
    return app
