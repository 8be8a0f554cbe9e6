from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from shared.settings import AuthSettings, ServiceSettings


class LLMSettings(ServiceSettings):
    """LLM (Gemma) service. Environment prefix ``GEMMA_``; the seed's names still work."""

    model_config = SettingsConfigDict(env_prefix="GEMMA_")

    port: int = Field(default=8001, ge=1, le=65535)
    max_body_mb: float = Field(default=4.0, gt=0, le=1024)
    """Requests with a larger body get 413."""
    model_path: str = "smollm2-135m-instruct"
    """A GGUF file, or a preset name (gemma-3-4b-it, gemma-3-270m, smollm2-135m-instruct)."""
    model_name: str | None = None
    """The id clients use in ``model`` (default: the preset name or the file's stem)."""
    chat_format: str | None = None
    """Override the chat template: ``gemma`` or ``chatml``; default: the GGUF's own, else Gemma's."""
    gpu_layers: int = Field(default=25, ge=-1)
    """Layers to put on the GPU while holding the lease (-1: all)."""
    context_size: int = Field(default=65536, ge=256)
    """Context window in tokens; capped at what the model was trained for."""
    batch_size: int = Field(default=512, ge=1)
    """Tokens one decode step may carry (a prompt read whole when nothing else runs)."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for llama.cpp (default: every core)."""
    max_tokens: int = Field(default=2048, ge=1)
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = Field(default=512, ge=1)
    """``max_tokens`` when a request gives none."""
    max_messages: int = Field(default=1000, ge=1)
    """Requests with more messages get 400 before any work."""
    max_queue: int = Field(default=32, ge=0)
    """Requests waiting for a slot (every slot busy) beyond this many get 429."""
    max_conversations: int = Field(default=100, ge=1, le=100_000)
    """Conversations each subject may keep (429 past it)."""
    max_conversation_messages: int = Field(default=2000, ge=2, le=1_000_000)
    """Messages one conversation may hold (429 past it)."""
    max_conversation_kb: int = Field(default=1024, ge=1, le=1_048_576)
    """What one conversation's messages may take, in KB (429 past it)."""
    max_conversations_mb: int = Field(default=32, ge=1, le=1_048_576)
    """What all of one subject's conversations may take, in MB (429 past it)."""
    max_tools: int = Field(default=128, ge=1, le=10_000)
    """Tools one request may describe (OpenAI's bound)."""
    cache_ttl_s: float = Field(default=300.0, ge=0, le=86_400)
    """How long an answer to a deterministic request is served again from the cache (0: no cache)."""
    cache_entries: int = Field(default=1000, ge=0, le=1_000_000)
    """Answers the cache keeps at most, the least recently used going first."""
    parallel: int | None = Field(default=None, ge=1, le=256)
    """Sequences decoded together in one batch. Default from the device: 8 on the CPU
    (the aggregate speed stops growing past 8 on 2 cores), 32 with a GPU."""
    prefill_chunk: int = Field(default=0, ge=0, le=8192)
    """Prompt tokens read per step while other streams decode (0: measured at start, so
    that one chunk costs about one decode step of a full batch)."""
    prefix_cache_entries: int = Field(default=32, ge=0, le=200)
    """Finished sequences kept in the KV cache for requests that start the same way."""
    prefix_cache_cells: int | None = Field(default=None, ge=0)
    """KV cells those may hold at most (default: half the context), but for the newest,
    kept whatever its length. They give way to running requests whenever these need
    the room."""
    grammar_step_budget_ms: float = Field(default=10.0, ge=0, le=10_000)
    """A sequence whose grammar took longer than this for one token is sampled beside the
    batch from then on, sitting out steps until its token is ready, so that a dear
    grammar never holds the other streams back."""
    generation_budget_s: float = Field(default=300.0, gt=0, le=86_400)
    """A generation that runs longer ends (finish_reason length, with a warning): no
    request holds the model past its share."""

    coordinator_url: str = Field(
        default="http://127.0.0.1:8002",
        validation_alias=AliasChoices("GPU_COORDINATOR_URL", "GEMMA_COORDINATOR_URL"),
    )
    """The GPU coordinator."""
    gpu_wait_ms: int = Field(default=10000, ge=0, le=300000)
    """How long a request waits for the GPU lease."""
    gpu_fallback: Literal["cpu", "fail"] = "cpu"
    """Lease not granted in time: serve on the CPU, or answer 503."""
    keep_alive_s: float = Field(default=30.0, ge=0)
    """Keep the GPU this long after a request while nobody else waits for it."""
    lease_ttl_ms: int = Field(default=15000, ge=1000, le=120000)
    """TTL of the lease; renewed in the background every third of it."""
    coordinate: bool = True
    """Take the GPU lease. False only for comparisons (benchmarks/stack.py): the LLM
    and transcription then fight over the card."""
    vram_mb: int | None = Field(default=None, ge=0, le=1_048_576)
    """Device memory this service declares in its leases (weights, KV cache, CUDA context).
    Unset: estimated from the GGUF's size (shared.gpu.vram_estimate_mb), which leaves out
    a long context's KV cache: set it on a card where memory is tight."""
    backends_file: Path | None = None
    """A YAML file of remote OpenAI-compatible backends and routing rules (services/llm/backends/config.py)."""
    sql_databases: dict[str, str] = Field(default_factory=dict)
    """Databases ``POST /v1/sql`` may name, as JSON: ``{"inventory": "sqlite:////data/inventory.db",
    "sales": "postgresql://reader@db/sales"}``. SQLite files are opened read-only; on
    PostgreSQL give a read-only role and keep its password in a pgpass file (PGPASSFILE)."""
    sql_default_database: str | None = None
    """The database the seed's ``POST /query`` uses (default: the first one)."""
    sql_timeout_s: float = Field(default=5.0, gt=0, le=300)
    """A statement running longer is stopped (422 query_timeout)."""
    sql_max_grammar_columns: int = Field(default=400, ge=16, le=100_000)
    """Column names a text-to-SQL grammar may spell over all its FROM clauses. A wider
    schema is narrowed to the tables the question speaks of (a grammar's cost per token
    grows with these: 8 tables of 64 columns spell 5,754 and cost 0.9 s a token)."""
    grammar_max_repeat: int = Field(default=1000, ge=1, le=100_000)
    """Largest repetition a grammar enforces: minLength/maxLength, minItems/maxItems,
    {n,m} in patterns (400 past it). llama.cpp's parser overflows its stack near 20,000."""
    grammar_max_depth: int = Field(default=32, ge=1, le=1000)
    """Deepest nesting of a json_schema or a tool's parameters."""
    grammar_max_nodes: int = Field(default=4000, ge=1, le=1_000_000)
    """Subschemas and enum values of one schema."""
    grammar_max_kb: int = Field(default=256, ge=1, le=65536)
    """Largest grammar (GBNF text) sent to llama.cpp."""
    grammar_max_compile_ms: float = Field(default=500.0, gt=0, le=60_000)
    """CPU time llama.cpp may take to compile a grammar."""
    grammar_max_us_per_token: float = Field(default=5.0, gt=0, le=1_000_000)
    """CPU microseconds a grammar may take per vocabulary token in a masked step, as
    measured once per grammar (services/llm/engine/grammar.py)."""
    force_reload: bool = False
    """Reload the model to move layers even on a llama.cpp build that cannot offload (tests)."""

    rag_url: str = Field(
        default="http://127.0.0.1:8004",
        validation_alias=AliasChoices("RAG_SERVICE_URL", "GEMMA_RAG_URL"),
    )
    """The RAG service."""
    rag_timeout_ms: int = Field(default=1500, ge=50, le=60000)
    """A RAG answer slower than this is skipped: the chat goes on without memories."""
    rag_top_k: int = Field(default=5, ge=1, le=50)
    """Passages asked for when a request says ``rag`` without ``top_k``."""

    auth: AuthSettings = Field(default_factory=AuthSettings)
