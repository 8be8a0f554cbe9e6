"""The LLM service's parts, built from its settings: ``build(settings)``. The app (app.py)
is made from them, so a test can build the parts with a stand-in for the card, the
memories or a backend and serve them in-process. Nothing here reads the model yet:
``Parts.start`` loads it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from services.llm.backends.config import BackendsFileError
from services.llm.backends.config import load as load_backends
from services.llm.backends.remote import BackendMetrics, Remote
from services.llm.chat.cache import ResponseCache
from services.llm.chat.service import ChatMetrics, ChatService
from services.llm.conversations.store import ConversationStore
from services.llm.engine import Engine
from services.llm.engine.grammar import GrammarLimits
from services.llm.gpu_policy import GpuPolicy, GpuPolicyMetrics
from services.llm.memories import Memories
from services.llm.settings import LLMSettings
from services.llm.sql.databases import BadDatabaseUrl, Database, open_database
from services.llm.sql.service import SqlService
from shared.client import ServiceClient
from shared.gpu import Gpu, vram_estimate_mb
from shared.service import Foundation, model
from shared.settings import ConfigError, load_settings

SERVICE_SCOPES = ("gpu", "rag:read")


@dataclass
class Parts:
    settings: LLMSettings
    base: Foundation
    model_id: str
    model_path: Path
    engine: Engine
    gpu: Gpu
    policy: GpuPolicy
    memories: Memories
    conversations: ConversationStore
    cache: ResponseCache
    remote: Remote | None
    chat: ChatService
    sql: SqlService
    loaded: bool = False

    async def start(self) -> None:
        await asyncio.to_thread(self.engine.load, 0)  # on the CPU until a request holds the GPU
        self.policy.attach()
        await self.sql.read_schemas()
        self.loaded = True

    async def close(self) -> None:
        await self.policy.close()
        await self.gpu.aclose()
        await self.memories.aclose()
        if self.remote is not None:
            await self.remote.aclose()
        await asyncio.to_thread(self.engine.close)
        await self.base.guards.aclose()


def build(settings: LLMSettings | None = None, *, gpu: Gpu | None = None) -> Parts:
    """Every part, nothing started. ``gpu``: a stand-in for the coordinator's client."""
    settings = settings or load_settings(LLMSettings)
    base = Foundation.build("llm", settings, calls_with=SERVICE_SCOPES)
    path, preset = model(settings.model_path, "llm", "GEMMA_MODEL_PATH")
    model_id = settings.model_name or (preset.name if preset else path.stem)
    engine = Engine(
        path,
        context_size=settings.context_size,
        batch_size=settings.batch_size,
        threads=settings.threads,
        chat_format=settings.chat_format or (preset.chat_format if preset else None),
        grammar_limits=grammar_limits(settings),
        parallel=settings.parallel,
        prefill_chunk=settings.prefill_chunk,
        cache_entries=settings.prefix_cache_entries,
        cache_cells=settings.prefix_cache_cells,
        budget_s=settings.generation_budget_s,
        grammar_step_ms=settings.grammar_step_budget_ms,
    )
    gpu = gpu or base.gpu(settings)
    vram_mb = settings.vram_mb if settings.vram_mb is not None else vram_estimate_mb(path.stat().st_size)
    policy = GpuPolicy(engine, gpu, settings, GpuPolicyMetrics(base.metrics), vram_mb)
    memories = Memories(ServiceClient(settings.rag_url, base.tokens, retries=0), settings.rag_timeout_ms / 1000)
    conversations = ConversationStore(
        base.guards.redis,
        settings.limits.key_prefix,
        settings.max_conversations,
        settings.max_conversation_messages,
        settings.max_conversation_kb * 1024,
        settings.max_conversations_mb * 1_048_576,
    )
    cache = ResponseCache(settings.cache_ttl_s, settings.cache_entries)
    remote = _remote(settings, model_id, base)
    chat = ChatService(
        engine, policy, memories, settings, ChatMetrics(base.metrics), model_id, conversations, cache, remote
    )
    sql = SqlService(
        databases(settings), settings.sql_default_database, settings.sql_timeout_s, settings.sql_max_grammar_columns
    )
    if sql.default is None and sql.databases:
        sql.default = next(iter(sql.databases))
    return Parts(settings, base, model_id, path, engine, gpu, policy, memories, conversations, cache, remote, chat, sql)


def _remote(settings: LLMSettings, model_id: str, base: Foundation) -> Remote | None:
    """GEMMA_BACKENDS_FILE's backends, or None; a bad file stops the start."""
    if settings.backends_file is None:
        return None
    try:
        backends = load_backends(settings.backends_file, model_id)
    except BackendsFileError as exc:
        raise ConfigError(f"GEMMA_BACKENDS_FILE: {exc}") from None
    return Remote(backends, BackendMetrics(base.metrics))


def databases(settings: LLMSettings) -> dict[str, Database]:
    """GEMMA_SQL_DATABASES, each SQLite file read now; a bad entry stops the start."""
    found = {}
    for name, url in settings.sql_databases.items():
        try:
            found[name] = open_database(name, url)
        except BadDatabaseUrl as exc:
            raise ConfigError(f"GEMMA_SQL_DATABASES: {exc}") from None
    default = settings.sql_default_database
    if default is not None and default not in found:
        raise ConfigError(f"GEMMA_SQL_DEFAULT_DATABASE: {default!r} is not in GEMMA_SQL_DATABASES")
    return found


def grammar_limits(settings: LLMSettings) -> GrammarLimits:
    return GrammarLimits(
        max_repeat=settings.grammar_max_repeat,
        max_depth=settings.grammar_max_depth,
        max_nodes=settings.grammar_max_nodes,
        max_bytes=settings.grammar_max_kb * 1024,
        max_compile_ms=settings.grammar_max_compile_ms,
        max_us_per_token=settings.grammar_max_us_per_token,
    )
