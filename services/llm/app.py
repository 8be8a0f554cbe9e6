"""The LLM app: ``create_app(settings)``; nothing is created at import."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.llm.answer import ClientGone
from services.llm.backends import BackendsFileError
from services.llm.backends import load as load_backends
from services.llm.cache import ResponseCache
from services.llm.chat import ChatMetrics, ChatService
from services.llm.conversations import ConversationStore
from services.llm.engine import Engine, can_offload
from services.llm.engine.grammar import GrammarLimits
from services.llm.memories import Memories
from services.llm.placement import GpuPolicy, PlacementMetrics
from services.llm.remote import BackendMetrics, Remote
from services.llm.routes import client_gone, router
from services.llm.settings import LLMSettings
from services.llm.sql.api import build_router as build_sql_router
from services.llm.sql.databases import BadDatabaseUrl, Database, open_database
from services.llm.sql.service import SqlService
from shared import __version__
from shared.client import ServiceClient
from shared.gpu import vram_estimate_mb
from shared.limits import subject_key
from shared.metrics import Sample
from shared.service import Foundation, model
from shared.settings import ConfigError, load_settings
from shared.web import Readiness

SERVICE_SCOPES = ("gpu", "rag:read")


def create_app(settings: LLMSettings | None = None) -> FastAPI:
    settings = settings or load_settings(LLMSettings)
    base = Foundation.build("llm", settings, calls_with=SERVICE_SCOPES)
    guards, auth, metrics = base.guards, base.auth, base.metrics
    path, preset = model(settings.model_path, "llm", "GEMMA_MODEL_PATH")
    chat_format = settings.chat_format or (preset.chat_format if preset else None)
    model_id = settings.model_name or (preset.name if preset else path.stem)
    chat_metrics = ChatMetrics(metrics)
    engine = Engine(
        path,
        context_size=settings.context_size,
        batch_size=settings.batch_size,
        threads=settings.threads,
        chat_format=chat_format,
        grammar_limits=_grammar_limits(settings),
        parallel=settings.parallel,
        prefill_chunk=settings.prefill_chunk,
        cache_entries=settings.prefix_cache_entries,
        cache_cells=settings.prefix_cache_cells,
        budget_s=settings.generation_budget_s,
        grammar_step_ms=settings.grammar_step_budget_ms,
    )
    gpu = base.gpu(settings)
    vram_mb = settings.vram_mb if settings.vram_mb is not None else vram_estimate_mb(path.stat().st_size)
    policy = GpuPolicy(engine, gpu, settings, PlacementMetrics(metrics), vram_mb)
    memories = Memories(ServiceClient(settings.rag_url, base.tokens, retries=0), settings.rag_timeout_ms / 1000)
    conversations = ConversationStore(
        guards.redis,
        settings.limits.key_prefix,
        settings.max_conversations,
        settings.max_conversation_messages,
        settings.max_conversation_kb * 1024,
        settings.max_conversations_mb * 1_048_576,
    )
    cache = ResponseCache(settings.cache_ttl_s, settings.cache_entries)
    remote = None
    if settings.backends_file is not None:
        try:
            backends = load_backends(settings.backends_file, model_id)
        except BackendsFileError as exc:
            raise ConfigError(f"GEMMA_BACKENDS_FILE: {exc}") from None
        remote = Remote(backends, BackendMetrics(metrics))
    chat = ChatService(engine, policy, memories, settings, chat_metrics, model_id, conversations, cache, remote)
    metrics.collect(lambda: batch_samples(engine))
    sql = SqlService(
        _databases(settings), settings.sql_default_database, settings.sql_timeout_s, settings.sql_max_grammar_columns
    )
    if sql.default is None and sql.databases:
        sql.default = next(iter(sql.databases))
    state = {"loaded": False}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(engine.load, 0)  # on the CPU until a request holds the GPU
        policy.attach()
        await sql.read_schemas()
        state["loaded"] = True
        try:
            yield
        finally:
            await policy.close()
            await gpu.aclose()
            await memories.aclose()
            if remote is not None:
                await remote.aclose()
            await asyncio.to_thread(engine.close)
            await guards.aclose()

    async def ready() -> Readiness:
        return Readiness(state["loaded"], {"model": model_id})

    def public_info() -> dict[str, Any]:
        return {
            "model": model_id,
            "context_size": engine.n_ctx,
            "limits": {"max_tokens": settings.max_tokens, "max_queue": settings.max_queue, "parallel": engine.parallel}
            | settings.limits.public(),
        }

    def info() -> dict[str, Any]:
        return {
            "model_path": str(path),
            "chat_format": engine.chat_format,
            "context_size": engine.n_ctx,
            "device": "gpu" if engine.gpu_layers and can_offload() else "cpu",
            "gpu_layers": settings.gpu_layers,
            "gpu_layers_loaded": engine.gpu_layers,
            "can_offload": can_offload(),
            "handoff": policy.settings_summary(),
            "response_cache": cache.info(),
            "engine": engine.info(),
            "backends": remote.info() if remote is not None else [],
            "sql_databases": sql.info(),
        }

    def seed_info() -> dict[str, Any]:
        """The seed's ``GET /info``."""
        return {"model": model_id, "threads": engine.threads, "context_size": engine.n_ctx, "version": __version__}

    app = base.app(settings.max_body_mb, lifespan=lifespan, ready=ready, info=info, public_info=public_info)
    app.state.chat, app.state.conversations = chat, conversations  # the routes' dependencies
    app.include_router(router)
    app.include_router(build_sql_router(chat, sql, auth, seed_info))
    app.add_exception_handler(ClientGone, client_gone)

    def max_tokens_in_schema(document: dict[str, Any]) -> None:
        """The document states GEMMA_MAX_TOKENS as max_tokens' maximum, and the one model
        served (any other name gets 404 model_not_found)."""
        schemas = document.get("components", {}).get("schemas", {})
        model = schemas.get("ChatCompletionRequest", {}).get("properties", {}).get("model")
        if model is not None:
            model["enum"] = chat.models()
        for model in ("ChatCompletionRequest", "SeedChatRequest"):
            fields = schemas.get(model, {}).get("properties", {})
            for name in ("max_tokens", "max_completion_tokens"):
                for branch in fields.get(name, {}).get("anyOf", ()):
                    if branch.get("type") == "integer":
                        branch["maximum"] = settings.max_tokens

    app.state.openapi_refinements = [max_tokens_in_schema]
    return app


def _databases(settings: LLMSettings) -> dict[str, Database]:
    """GEMMA_SQL_DATABASES, each SQLite file read now; a bad entry stops the start."""
    databases = {}
    for name, url in settings.sql_databases.items():
        try:
            databases[name] = open_database(name, url)
        except BadDatabaseUrl as exc:
            raise ConfigError(f"GEMMA_SQL_DATABASES: {exc}") from None
    default = settings.sql_default_database
    if default is not None and default not in databases:
        raise ConfigError(f"GEMMA_SQL_DEFAULT_DATABASE: {default!r} is not in GEMMA_SQL_DATABASES")
    return databases


def _grammar_limits(settings: LLMSettings) -> GrammarLimits:
    return GrammarLimits(
        max_repeat=settings.grammar_max_repeat,
        max_depth=settings.grammar_max_depth,
        max_nodes=settings.grammar_max_nodes,
        max_bytes=settings.grammar_max_kb * 1024,
        max_compile_ms=settings.grammar_max_compile_ms,
        max_us_per_token=settings.grammar_max_us_per_token,
    )


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
