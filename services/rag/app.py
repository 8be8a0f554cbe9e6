"""The RAG app: ``create_app(parts)`` (parts.py; settings are built into parts); nothing
is created at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from services.rag.api import EMBEDDING_MODEL, Memories, router
from services.rag.errors import ERRORS
from services.rag.parts import Parts, build
from services.rag.settings import RAGSettings
from shared.errors import map_errors
from shared.web import Readiness


def create_app(parts: Parts | RAGSettings | None = None) -> FastAPI:
    if not isinstance(parts, Parts):
        parts = build(parts)
    made = parts
    settings, base, memories = made.settings, made.base, made.store
    auth = base.auth
    warm = {"done": False}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(memories.warm_up)
        warm["done"] = True
        try:
            yield
        finally:
            await made.close()

    async def ready() -> Readiness:
        ok = warm["done"] and await run_in_threadpool(memories.heartbeat)
        detail = {"chroma": "ok" if ok else "unreachable"}
        if memories.failure:
            detail["chroma"] = f"the last write failed ({memories.failure})"
        return Readiness(ok, detail)

    def public_info() -> dict[str, Any]:
        return {
            "model": EMBEDDING_MODEL,
            "limits": {"max_documents": settings.max_documents} | settings.limits.public(),
        }

    def info() -> dict[str, Any]:
        return {
            "device": "cpu",
            "chroma": settings.chroma_url or f"embedded at {settings.chroma_path}",
            "collection": settings.collection,
            "chunk_size": settings.chunk_size,
            "chunk_overlap": settings.chunk_overlap,
            "recency_half_life_h": settings.recency_half_life_h,
            "recency_bias": settings.recency_bias,
        }

    app = base.app(settings.max_body_mb, lifespan=lifespan, ready=ready, info=info, public_info=public_info)

    map_errors(app, ERRORS)
    app.state.memories = Memories(memories, auth.limiter, settings.max_documents)  # the routes' dependency
    app.include_router(router)

    def token_ids_in_schema(document: dict[str, Any]) -> None:
        """The document states the embedding model's vocabulary as a token id's maximum."""
        size = getattr(memories.embedder, "vocabulary_size", None)
        schema = document.get("components", {}).get("schemas", {}).get("EmbeddingsIn", {})
        if size is None:
            return

        def bound(branch: dict[str, Any]) -> None:
            items = branch.get("items", {})
            if items.get("type") == "integer":
                items["maximum"] = size - 1
            elif items.get("type") == "array":
                bound(items)

        for branch in schema.get("properties", {}).get("input", {}).get("anyOf", ()):
            if branch.get("type") == "array":
                bound(branch)

    app.state.openapi_refinements = [token_ids_in_schema]
    return app
