"""The llm app (skeleton until its issue lands): health, readiness, info."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from services.llm.settings import LLMSettings
from shared.auth import TokenVerifier
from shared.metrics import Metrics
from shared.settings import load_settings
from shared.web import Auth, create_service_app


def create_app(settings: LLMSettings | None = None) -> FastAPI:
    settings = settings or load_settings(LLMSettings)
    auth = Auth(TokenVerifier(settings.auth))

    def info() -> dict[str, Any]:
        return {"model": None, "device": "cpu"}

    return create_service_app(
        name="llm",
        auth=auth,
        metrics=Metrics("llm"),
        max_body_bytes=int(settings.max_body_mb * 1_048_576),
        info=info,
    )
