"""HTTP routes of the RAG service: thin, module-level, with typed dependencies (the
caller, and the ``Memories`` the app was built with, from ``app.state``); the work is in
:mod:`store`, in threads."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from services.rag.store import InputTooLong, MemoryStore, NotFound, Stored
from shared.auth import SERVICE_SUBJECT_PREFIX
from shared.errors import BadRequest, Forbidden
from shared.errors import NotFound as NotFoundError
from shared.limits import Limiter
from shared.protocol.models import ModelCard, ModelList, created_at, found_model
from shared.protocol.rag import (
    CollectionName,
    DocumentsIn,
    DocumentsOut,
    EmbeddingsIn,
    QueryIn,
    QueryOut,
    SegmentsIn,
)
from shared.web import Caller, audit_note, calling

EMBEDDING_MODEL = "all-minilm-l6-v2"


class Memories:
    """The store, with the bounds and the per-user quota every write is held to."""

    def __init__(self, store: MemoryStore, limiter: Limiter | None, max_items: int) -> None:
        self.store = store
        self.limiter = limiter
        self.max_items = max_items

    def check_size(self, count: int, what: str) -> None:
        if count > self.max_items:
            raise BadRequest(f"at most {self.max_items} {what} per request (RAG_MAX_DOCUMENTS)", code="too_many")

    async def check_quota(self, owner: str, texts: list[str]) -> None:
        """Before embedding: would this take the owner past their stored-text quota?"""
        if self.limiter is not None and not owner.startswith(SERVICE_SUBJECT_PREFIX):
            await self.limiter.check_storage(owner, sum(len(t.encode("utf-8")) for t in texts))

    async def count(self, stored: Stored) -> None:
        if self.limiter is not None:
            for owner, delta in stored.bytes_by_owner.items():
                if owner:
                    await self.limiter.stored(owner, delta)


def memories(request: Request) -> Memories:
    found: Memories = request.app.state.memories
    return found


Writer = Annotated[Caller, Depends(calling("rag:write"))]
Reader = Annotated[Caller, Depends(calling("rag:read"))]
TheMemories = Annotated[Memories, Depends(memories)]

router = APIRouter(prefix="/v1", tags=["rag"])


@router.post("/documents")
async def add_documents(body: DocumentsIn, caller: Writer, kept: TheMemories) -> DocumentsOut:
    kept.check_size(len(body.documents), "documents")
    if any(d.shared for d in body.documents) and not (caller.admin or "rag:share" in caller.scopes):
        raise Forbidden(("rag:share",))
    await kept.check_quota(caller.subject, [d.text for d in body.documents])
    stored = await run_in_threadpool(kept.store.add_documents, body.documents, body.collection, caller.subject)
    await kept.count(stored)
    return DocumentsOut(ids=stored.ids, chunks=stored.chunks)


@router.post("/segments")
async def add_segments(body: SegmentsIn, caller: Writer, kept: TheMemories) -> DocumentsOut:
    kept.check_size(len(body.segments), "segments")
    await kept.check_quota(caller.subject, [s.text for s in body.segments])
    stored = await run_in_threadpool(kept.store.add_segments, body, caller.subject)
    await kept.count(stored)
    return DocumentsOut(ids=stored.ids, chunks=stored.chunks)


@router.post("/query")
async def query(body: QueryIn, request: Request, caller: Reader, kept: TheMemories) -> QueryOut:
    results = await run_in_threadpool(kept.store.query, body, caller)
    if caller.admin:
        others = sorted({str(r.metadata.get("owner")) for r in results if r.metadata.get("owner") != caller.subject})
        if others:
            audit_note(request, "admin_read", owners=others, results=len(results))
    return QueryOut(results=results)


@router.delete("/documents/{memory_id}", status_code=204)
async def delete(
    memory_id: str, caller: Writer, kept: TheMemories, collection: Annotated[CollectionName | None, Query()] = None
) -> Response:
    try:
        stored = await run_in_threadpool(kept.store.delete, memory_id, collection, caller)
    except NotFound:
        raise NotFoundError(f"no document, transcript or segment {memory_id!r}") from None
    await kept.count(stored)
    return Response(status_code=204)


@router.get("/stats")
async def stats(caller: Reader, kept: TheMemories) -> dict[str, object]:
    counts = await run_in_threadpool(kept.store.stats, caller)
    return {"collections": counts, "total": sum(counts.values())}


def model_list(kept: Memories) -> ModelList:
    folder = getattr(kept.store.embedder, "DOWNLOAD_PATH", None)
    return ModelList.of("embeddings", EMBEDDING_MODEL, created=created_at(Path(folder) if folder else None))


@router.get("/models", response_model=ModelList)
async def models(_: Reader, kept: TheMemories) -> ModelList:
    return model_list(kept)


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, _: Reader, kept: TheMemories) -> ModelCard:
    return found_model(model_list(kept), model_id)


@router.post("/embeddings")
async def embeddings(body: EmbeddingsIn, _: Reader, kept: TheMemories) -> dict[str, object]:
    if body.model != EMBEDDING_MODEL:
        raise NotFoundError(f"the model {body.model!r} does not exist; use {EMBEDDING_MODEL!r}", code="model_not_found")
    inputs = body.inputs()
    if not inputs or any(not item for item in inputs):
        raise BadRequest("input must be non-empty text or token ids, or a list of them", param="input")
    kept.check_size(len(inputs), "inputs")
    if body.dimensions is not None and body.dimensions != 384:
        raise BadRequest("this model has 384 dimensions", param="dimensions")
    given_tokens = None
    try:
        if isinstance(inputs[0], list):
            ids = inputs
            given_tokens = sum(len(i) for i in ids)
            texts = await run_in_threadpool(kept.store.texts_of, ids)
        else:
            texts = inputs
        vectors, tokens = await run_in_threadpool(kept.store.embed, texts)
    except InputTooLong as exc:
        raise BadRequest(str(exc), param="input", code="context_length_exceeded") from None
    tokens = given_tokens if given_tokens is not None else tokens
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
        for i, vector in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": EMBEDDING_MODEL,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]
