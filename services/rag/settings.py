from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import AuthSettings, ServiceSettings


class RAGSettings(ServiceSettings):
    """RAG service. Environment prefix ``RAG_``."""

    model_config = SettingsConfigDict(env_prefix="RAG_")

    port: int = Field(default=8004, ge=1, le=65535)
    max_body_mb: float = Field(default=10.0, gt=0, le=1024)
    """Requests with a larger body get 413."""
    chroma_path: Path = Path(".run/chroma")
    """Folder of the embedded Chroma database (when RAG_CHROMA_URL is not set)."""
    chroma_url: str | None = None
    """A Chroma server, e.g. http://chroma:8000; overrides RAG_CHROMA_PATH."""
    journal_path: Path | None = None
    """The journal of every record stored (SQLite), the source of a rebuild; by default
    ``rag-journal.sqlite3`` beside RAG_CHROMA_PATH. Keep it on a volume."""
    embedding_model: str = "all-minilm-l6-v2"
    """Preset name, or a folder holding ``onnx/`` laid out for Chroma's MiniLM function."""
    collection: str = Field(default="memories", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,61}[a-zA-Z0-9]$")
    """Collection used when a request names none."""
    chunk_size: int = Field(default=800, ge=100, le=4000)
    """Largest chunk, in characters (MiniLM reads at most 256 tokens)."""
    chunk_overlap: int = Field(default=120, ge=0)
    """Characters of whole sentences repeated at the start of the next chunk."""
    recency_half_life_h: float = Field(default=24 * 14, gt=0)
    """Age at which a memory's recency weight halves."""
    recency_bias: float = Field(default=0.1, ge=0, le=1)
    """Weight of recency in the score when a query gives none (0: similarity only)."""
    max_documents: int = Field(default=1000, ge=1)
    """Most documents or segments in one request."""

    auth: AuthSettings = Field(default_factory=AuthSettings)

    @model_validator(mode="after")
    def _overlap_fits(self) -> RAGSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("RAG_CHUNK_OVERLAP must be smaller than RAG_CHUNK_SIZE")
        return self

    @property
    def journal(self) -> Path:
        return self.journal_path or self.chroma_path.parent / "rag-journal.sqlite3"
