from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from shared.settings import AuthSettings, ServiceSettings


class TranscriptionSettings(ServiceSettings):
    """Transcription service. Environment prefix ``TRANSCRIPTION_``."""

    model_config = SettingsConfigDict(env_prefix="TRANSCRIPTION_")

    port: int = Field(default=8003, ge=1, le=65535)
    model: str = "whisper-tiny.en"
    """A faster-whisper model folder, or a preset name (whisper-tiny.en, whisper-large-v3-turbo)."""
    device: str = "cpu"
    """cpu or cuda."""
    compute_type: str = "int8"
    """CTranslate2 compute type (int8 on CPU, float16 on GPU)."""
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("TRANSCRIPTION_REDIS_URL", "REDIS_URL"),
    )
    """Redis for jobs and their checkpoints."""
    coordinator_url: str = Field(
        default="http://127.0.0.1:8002",
        validation_alias=AliasChoices("GPU_COORDINATOR_URL", "TRANSCRIPTION_COORDINATOR_URL"),
    )
    rag_url: str = Field(
        default="http://127.0.0.1:8004",
        validation_alias=AliasChoices("RAG_SERVICE_URL", "TRANSCRIPTION_RAG_URL"),
    )

    auth: AuthSettings = Field(default_factory=AuthSettings)
