from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import AuthSettings, ServiceSettings


class TranscriptionSettings(ServiceSettings):
    """Transcription service. Environment prefix ``TRANSCRIPTION_``."""

    model_config = SettingsConfigDict(env_prefix="TRANSCRIPTION_")

    port: int = Field(default=8003, ge=1, le=65535)
    model: str = "whisper-tiny.en"
    """A faster-whisper model folder, or a preset name (whisper-tiny.en, whisper-large-v3-turbo)."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where CTranslate2 runs the model."""
    compute_type: str = "int8"
    """CTranslate2 compute type: int8 on CPU, float16 (or int8_float16) on GPU."""
    threads: int = Field(default=0, ge=0)
    """CPU threads for CTranslate2 (0: its default)."""
    beam_size: int = Field(default=5, ge=1, le=10)
    """Beam search width."""
    chunk_length_s: int = Field(default=30, ge=5, le=30)
    """Decode window. Shorter windows yield the GPU sooner, at some cost in accuracy."""
    max_upload_mb: float = Field(default=25.0, gt=0, le=2048)
    """Uploads larger than this get 413, enforced while the upload is read."""
    max_duration_s: float = Field(default=4 * 3600, gt=0, le=7 * 86400)
    """Audio longer than this gets 413."""
    decode_budget_mb: float = Field(default=2048.0, gt=0)
    """Decoded audio the service holds at once (64 KB per second: 4 h is 0.9 GB), shared
    by every upload and the running job; a file waits for its share."""
    decode_wait_s: float = Field(default=30.0, ge=0)
    """How long an upload waits for its share of the budget before a 503."""
    speaker_model: str = "speaker-campplus"
    """The speaker-embedding model (a preset name or a folder) that tells voices apart.
    Missing (or torch not installed), diarization is refused with a 400 that says so."""
    speaker_same: float = Field(default=0.75, gt=0, lt=1)
    """Cosine similarity above which two stretches of speech are one voice."""
    speaker_match: float = Field(default=0.7, gt=0, lt=1)
    """Cosine similarity a voice needs to take the name of an enrolled voice or a reference clip."""
    diarize: bool = True
    """Whether jobs label speakers unless the request says (``diarize``)."""
    data_dir: Path = Path(".run/transcription")
    """Where job uploads are kept until their transcript is indexed."""

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("TRANSCRIPTION_REDIS_URL", "REDIS_URL"),
    )
    """Redis for jobs and their checkpoints."""
    key_prefix: str = Field(default="baton:tx:", min_length=1, max_length=64)
    """Prefix of every Redis key of this service."""

    coordinator_url: str = Field(
        default="http://127.0.0.1:8002",
        validation_alias=AliasChoices("GPU_COORDINATOR_URL", "TRANSCRIPTION_COORDINATOR_URL"),
    )
    """The GPU coordinator."""
    gpu_wait_ms: int = Field(default=60000, ge=0, le=300000)
    """How long an interactive transcription waits for the GPU before 503."""
    lease_ttl_ms: int = Field(default=15000, ge=1000, le=120000)
    """TTL of the leases this service takes."""
    stall_s: float = Field(default=120.0, gt=0, le=86400)
    """A worker that holds the GPU and reports nothing (no window, no segment) this long is
    ended, the card released, and its request restarted from its checkpoint; the metric
    transcription_stalls_total and the audit log (worker_stalled) say so. A 30 s window
    takes about 1 s on 2 cores with tiny.en: raise it for a large model on a slow CPU."""
    coordinate: bool = True
    """Take the GPU lease. False only for comparisons (benchmarks/stack.py)."""
    vram_mb: int | None = Field(default=None, ge=0, le=1_048_576)
    """Device memory this service declares in its leases. Unset: estimated from the
    model's files, once per worker (shared.gpu.vram_estimate_mb)."""
    workers: int = Field(default=2, ge=1, le=8)
    """Worker processes, each with the model loaded: a second one lets an interactive
    request run while a job's worker is paused mid-window."""
    worker_nice: int = Field(default=10, ge=0, le=19)
    """CPU niceness of the workers and of the threads that decode uploaded audio, so that
    the services' own threads (and, on the CPU, the LLM) win the cores from them."""

    rag_url: str = Field(
        default="http://127.0.0.1:8004",
        validation_alias=AliasChoices("RAG_SERVICE_URL", "TRANSCRIPTION_RAG_URL"),
    )
    """The RAG service finished transcripts are indexed into."""
    index_retry_max_s: float = Field(default=60.0, gt=0)
    """Longest wait between attempts to index a transcript while RAG is unreachable."""

    auth: AuthSettings = Field(default_factory=AuthSettings)

    @model_validator(mode="after")
    def _budget_holds_the_longest(self) -> TranscriptionSettings:
        longest_mb = (self.max_duration_s + 1) * 16000 * 4 / 1_048_576
        if self.decode_budget_mb < longest_mb:
            raise ValueError(
                "TRANSCRIPTION_DECODE_BUDGET_MB must hold one file of TRANSCRIPTION_MAX_DURATION_S "
                f"({longest_mb:.0f} MB)"
            )
        return self
