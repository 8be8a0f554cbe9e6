from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
CollectionName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,61}[a-zA-Z0-9]$")]
MemoryId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")]
Scalar = str | int | float | bool

RESERVED_METADATA = frozenset(
    {
        "doc_id",
        "chunk",
        "chunks",
        "kind",
        "created_at",
        "doc_hash",
        "job_id",
        "start",
        "end",
        "owner",
        "shared",
        "doc_bytes",
    }
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentIn(Strict):
    id: MemoryId | None = None
    text: Text
    metadata: dict[str, Scalar] = Field(default_factory=dict)
    created_at: datetime | None = Field(default=None, description="When it was written (default: now); for recency.")
    shared: bool = Field(default=False, description="Visible to every user (needs scope rag:share).")

    @field_validator("metadata")
    @classmethod
    def _no_reserved_keys(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        clash = sorted(RESERVED_METADATA & set(value))
        if clash:
            raise ValueError(f"metadata keys reserved by the service: {', '.join(clash)}")
        return value


class DocumentsIn(Strict):
    documents: list[DocumentIn] = Field(min_length=1)
    collection: CollectionName | None = None

    @model_validator(mode="after")
    def _ids_unique(self) -> DocumentsIn:
        ids = [d.id for d in self.documents if d.id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError("document ids must be unique within a request")
        return self


class DocumentsOut(BaseModel):
    ids: list[str]
    chunks: int = Field(description="Chunks stored by this request (0 when everything was already there).")


class SegmentIn(Strict):
    text: Text
    start: float = Field(ge=0)
    end: float = Field(ge=0)
    speaker: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> SegmentIn:
        if self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class SegmentsIn(Strict):
    job_id: MemoryId
    source: Text
    recorded_at: datetime
    segments: list[SegmentIn] = Field(min_length=1)
    collection: CollectionName | None = None


class QueryFilter(Strict):
    source: str | None = None
    speaker: str | None = None
    job_id: str | None = None
    after: datetime | None = None
    before: datetime | None = None


class QueryIn(Strict):
    query: Text
    top_k: int = Field(default=5, ge=1, le=50)
    filter: QueryFilter | None = None
    recency_bias: float | None = Field(default=None, ge=0, le=1)
    collection: CollectionName | None = None


class Result(BaseModel):
    id: str
    text: str
    score: float
    similarity: float
    recency: float
    metadata: dict[str, Scalar]


class QueryOut(BaseModel):
    results: list[Result]


class EmbeddingsIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
