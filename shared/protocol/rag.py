"""The RAG service's API: documents, transcript segments, queries and their answers on the
wire. The RAG service validates with these models; the LLM and transcription services
build their requests with them."""

from __future__ import annotations

import re
from typing import Annotated, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from shared.wire import Fraction, Integer, NonNegativeInteger, Number, Timestamp

MAX_DOCUMENT_CHARS = 200_000
"""One document's text (about 250 chunks; embedding them takes seconds, not minutes)."""
MAX_REQUEST_CHARS = 400_000
"""All the text of one request to /v1/documents or /v1/segments."""
MAX_SHORT_CHARS = 4_000
"""A query, a segment, a source name or a metadata value."""
MAX_METADATA_KEYS = 32
METADATA_KEY = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
"""Metadata names: no ``$`` (Chroma's operators), not empty, at most 64 characters."""


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (it holds a lone surrogate)") from None
    return value


def _utf8_safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:80]


Text = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_SHORT_CHARS), AfterValidator(_utf8)
]
DocumentText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_DOCUMENT_CHARS), AfterValidator(_utf8)
]
# Strict numbers: a long string of digits must not pass as an int once it fails as a str.
MetaValue = (
    Annotated[str, StringConstraints(max_length=MAX_SHORT_CHARS), AfterValidator(_utf8)]
    | StrictInt
    | StrictFloat
    | StrictBool
)
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


_RESERVED_NAMES: list[JsonValue] = [*sorted(RESERVED_METADATA)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentIn(Strict):
    id: MemoryId | None = None
    text: DocumentText
    metadata: dict[str, MetaValue] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_KEYS,
        json_schema_extra={"propertyNames": {"pattern": METADATA_KEY, "not": {"enum": _RESERVED_NAMES}}},
    )
    created_at: Timestamp | None = Field(default=None, description="When it was written (default: now); for recency.")
    shared: bool = Field(default=False, strict=True, description="Visible to every user (needs scope rag:share).")

    @field_validator("metadata")
    @classmethod
    def _no_reserved_keys(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        bad = [key for key in value if not re.match(METADATA_KEY, key)]
        if bad:
            raise ValueError(
                f"metadata names start with a letter or _, then letters, digits, _ . - (at most 64): "
                f"{_utf8_safe(bad[0])!r} is not one"
            )
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
        if sum(len(d.text) for d in self.documents) > MAX_REQUEST_CHARS:
            raise ValueError(f"at most {MAX_REQUEST_CHARS} characters of text per request: send the rest in another")
        return self


class DocumentsOut(BaseModel):
    ids: list[str]
    chunks: int = Field(description="Chunks stored by this request (0 when everything was already there).")


MAX_OFFSET_S = 7 * 86400
"""A segment's place in its recording, in seconds: a week at most (transcription takes
at most TRANSCRIPTION_MAX_DURATION_S, 4 h by default)."""


class SegmentIn(Strict):
    text: Text
    start: Number = Field(ge=0, le=MAX_OFFSET_S)
    end: Number = Field(ge=0, le=MAX_OFFSET_S)
    speaker: Annotated[str, StringConstraints(max_length=256), AfterValidator(_utf8)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> SegmentIn:
        if self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class SegmentsIn(Strict):
    job_id: MemoryId
    source: Text
    recorded_at: Timestamp
    segments: list[SegmentIn] = Field(min_length=1)
    collection: CollectionName | None = None

    @model_validator(mode="after")
    def _bounded(self) -> SegmentsIn:
        if sum(len(s.text) for s in self.segments) > MAX_REQUEST_CHARS:
            raise ValueError(f"at most {MAX_REQUEST_CHARS} characters of text per request: send the rest in another")
        return self


class QueryFilter(Strict):
    source: Text | None = None
    speaker: Text | None = None
    job_id: Text | None = None
    after: Timestamp | None = None
    before: Timestamp | None = None


class QueryIn(Strict):
    query: Text
    top_k: Integer = Field(default=5, ge=1, le=50)
    filter: QueryFilter | None = None
    recency_bias: Fraction | None = None
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


TokenId = NonNegativeInteger
MAX_EMBEDDING_TOKENS = 512
"""Token ids one input may hold (the model reads 256; more is refused after decoding)."""
EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingsIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="Text, texts, or the model's own token ids (one list, or a list of lists)"
    )
    model: str
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("input")
    @classmethod
    def _utf8_input(cls, value: EmbeddingInput) -> EmbeddingInput:
        if isinstance(value, str):
            _utf8(value)
        for item in value if isinstance(value, list) else ():
            if isinstance(item, str):
                _utf8(item)
            elif isinstance(item, list) and len(item) > MAX_EMBEDDING_TOKENS:
                raise ValueError(f"at most {MAX_EMBEDDING_TOKENS} token ids per input")
        if isinstance(value, list) and value and isinstance(value[0], int) and len(value) > MAX_EMBEDDING_TOKENS:
            raise ValueError(f"at most {MAX_EMBEDDING_TOKENS} token ids per input")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs, one per embedding: texts, or token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(item, int) for item in value):
            return [cast(list[int], value)]
        return cast(list[str] | list[list[int]], value)

    dimensions: Integer | None = None
    user: str | None = None
