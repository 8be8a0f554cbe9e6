from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from shared.settings import AuthSettings, ServiceSettings


class LLMSettings(ServiceSettings):
    """LLM (Gemma) service. Environment prefix ``GEMMA_``; the seed's names still work."""

    model_config = SettingsConfigDict(env_prefix="GEMMA_")

    port: int = Field(default=8001, ge=1, le=65535)
    model_path: str = "smollm2-135m-instruct"
    """A GGUF file, or a preset name (gemma-3-4b-it, gemma-3-270m, smollm2-135m-instruct)."""
    gpu_layers: int = Field(default=25, ge=-1)
    """Layers to put on the GPU while holding the lease (-1: all)."""
    context_size: int = Field(default=65536, ge=256)
    """Context window in tokens (capped at what the model was trained for)."""
    batch_size: int = Field(default=512, ge=1)
    """Prompt-processing batch size."""
    coordinator_url: str = Field(
        default="http://127.0.0.1:8002",
        validation_alias=AliasChoices("GPU_COORDINATOR_URL", "GEMMA_COORDINATOR_URL"),
    )
    """The GPU coordinator."""
    rag_url: str = Field(
        default="http://127.0.0.1:8004",
        validation_alias=AliasChoices("RAG_SERVICE_URL", "GEMMA_RAG_URL"),
    )
    """The RAG service."""

    auth: AuthSettings = Field(default_factory=AuthSettings)
