"""The LLM app: ``create_app(parts)`` serves what ``build(settings)`` made (parts.py);
given settings, or nothing, it builds them first. Nothing is created at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.llm.chat.answer import ClientGone
from services.llm.chat.routes import client_gone, router
from services.llm.completions.routes import router as completions_router
from services.llm.engine import Engine, can_offload
from services.llm.parts import Parts, build
from services.llm.responses.routes import router as responses_router
from services.llm.responses.store import ResponseLinks
from services.llm.settings import LLMSettings
from services.llm.sql.routes import router as sql_router
from shared import __version__
from shared.limits import subject_key
from shared.metrics import Sample
from shared.web import Readiness


def create_app(parts: Parts | LLMSettings | None = None) -> FastAPI:
    if not isinstance(parts, Parts):
        parts = build(parts)
    made = parts
    settings, engine, chat = made.settings, made.engine, made.chat
    made.base.metrics.collect(lambda: batch_samples(engine))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await made.start()
        try:
            yield
        finally:
            await made.close()

    async def ready() -> Readiness:
        return Readiness(made.loaded, {"model": made.model_id})

    def public_info() -> dict[str, Any]:
        return {
            "model": made.model_id,
            "context_size": engine.n_ctx,
            "limits": {"max_tokens": settings.max_tokens, "max_queue": settings.max_queue, "parallel": engine.parallel}
            | settings.limits.public(),
        }

    def info() -> dict[str, Any]:
        return {
            "model_path": str(made.model_path),
            "chat_format": engine.chat_format,
            "context_size": engine.n_ctx,
            "device": "gpu" if engine.gpu_layers and can_offload() else "cpu",
            "gpu_layers": settings.gpu_layers,
            "gpu_layers_loaded": engine.gpu_layers,
            "can_offload": can_offload(),
            "handoff": made.policy.settings_summary(),
            "response_cache": made.cache.info(),
            "engine": engine.info(),
            "backends": made.remote.info() if made.remote is not None else [],
            "sql_databases": made.sql.info(),
        }

    def seed_info() -> dict[str, Any]:
        """The seed's ``GET /info``."""
        return {"model": made.model_id, "threads": engine.threads, "context_size": engine.n_ctx, "version": __version__}

    app = made.base.app(settings.max_body_mb, lifespan=lifespan, ready=ready, info=info, public_info=public_info)
    app.state.parts = made
    app.state.chat, app.state.conversations = chat, made.conversations  # the routes' dependencies
    app.state.sql, app.state.seed_info = made.sql, seed_info
    app.include_router(router)
    app.state.response_links = ResponseLinks(made.conversations, settings.limits.key_prefix)
    app.include_router(completions_router)
    app.include_router(responses_router)
    app.include_router(sql_router)
    app.add_exception_handler(ClientGone, client_gone)

    def max_tokens_in_schema(document: dict[str, Any]) -> None:
        """The document states GEMMA_MAX_TOKENS as every length field's maximum, and the
        models served (any other name gets 404 model_not_found)."""
        schemas = document.get("components", {}).get("schemas", {})
        for request in ("ChatCompletionRequest", "CompletionRequest", "ResponseRequest"):
            model = schemas.get(request, {}).get("properties", {}).get("model")
            if model is not None:
                model["enum"] = chat.models()
        for request in ("ChatCompletionRequest", "SeedChatRequest", "CompletionRequest", "ResponseRequest"):
            fields = schemas.get(request, {}).get("properties", {})
            for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                for branch in fields.get(name, {}).get("anyOf", ()):
                    if branch.get("type") == "integer":
                        branch["maximum"] = settings.max_tokens

    app.state.openapi_refinements = [max_tokens_in_schema]
    return app


def batch_samples(engine: Engine) -> list[Sample]:
    """The running batch, for /metrics: its size, who waits (by subject key, never the
    name), the KV cells reserved and reused, the prefill chunks read."""
    if engine._scheduler is None:
        return []
    scheduler = engine.scheduler
    stats = scheduler.stats
    samples = [
        Sample("llm_batch_running", "Sequences in the running batch.", "gauge", {}, scheduler.running),
        Sample("llm_batch_slots", "Sequences the batch may hold (GEMMA_PARALLEL).", "gauge", {}, scheduler.parallel),
        Sample("llm_queue_depth", "Requests waiting for a slot.", "gauge", {}, scheduler.waiting),
        Sample("llm_kv_cells", "KV cells of the context.", "gauge", {}, scheduler.model.cells),
        Sample("llm_kv_cells_reserved", "KV cells the running sequences reserve.", "gauge", {}, scheduler.reserved),
        Sample("llm_kv_cells_cached", "KV cells the cached prefixes hold.", "gauge", {}, scheduler.cache.cells),
        Sample("llm_prefill_chunks", "Prefill chunks read so far.", "counter", {}, stats.prefill_chunks),
        Sample("llm_prefilled_tokens", "Prompt tokens read so far.", "counter", {}, stats.prefilled_tokens),
        Sample(
            "llm_kv_reused_tokens",
            "Prompt tokens taken from cached prefixes instead of read again.",
            "counter",
            {},
            stats.reused_tokens,
        ),
        Sample("llm_batch_steps", "Decode steps so far.", "counter", {}, stats.steps),
        Sample(
            "llm_grammar_resamples", "Tokens a grammar refused first (the dear path).", "counter", {}, stats.resampled
        ),
        Sample("llm_grammar_aside", "Tokens sampled beside the batch (a dear grammar).", "counter", {}, stats.aside),
        Sample("llm_generation_deadlines", "Generations ended by their time budget.", "counter", {}, stats.deadlines),
    ]
    for subject, waiting in scheduler.waiting_by_subject().items():
        samples.append(
            Sample(
                "llm_queue_by_subject",
                "Requests waiting, by subject key.",
                "gauge",
                {"subject": subject_key(subject)},
                waiting,
            )
        )
    return samples
