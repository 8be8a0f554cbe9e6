from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import AuthSettings, ServiceSettings


class RAGSettings(ServiceSettings):
    """RAG service. Environment prefix ``RAG_``."""

    model_config = SettingsConfigDict(env_prefix="RAG_")

    port: int = Field(default=8004, ge=1, le=65535)
    chroma_path: Path = Path(".run/chroma")
    """Folder of the embedded Chroma database (when RAG_CHROMA_URL is not set)."""
    chroma_url: str | None = None
    """A Chroma server, e.g. http://chroma:8000; overrides RAG_CHROMA_PATH."""

    auth: AuthSettings = Field(default_factory=AuthSettings)
