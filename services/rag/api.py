"""HTTP routes of the RAG service: thin; the work is in :mod:`store`, in threads."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from services.rag.store import InputTooLong, MemoryStore, NotFound, Stored
from shared.auth import SERVICE_SUBJECT_PREFIX
from shared.errors import BadRequest, Forbidden
from shared.errors import NotFound as NotFoundError
from shared.protocol.models import ModelList
from shared.protocol.rag import (
    CollectionName,
    DocumentsIn,
    DocumentsOut,
    EmbeddingsIn,
    QueryIn,
    QueryOut,
    SegmentsIn,
)
from shared.web import Auth, audit_note
from shared.web import caller as caller_of

EMBEDDING_MODEL = "all-minilm-l6-v2"


def build_router(store: MemoryStore, auth: Auth, max_items: int) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["rag"])
    writer = [Depends(auth.caller("rag:write"))]
    reader = [Depends(auth.caller("rag:read"))]

    def check_size(count: int, what: str) -> None:
        if count > max_items:
            raise BadRequest(f"at most {max_items} {what} per request (RAG_MAX_DOCUMENTS)", code="too_many")

    async def check_quota(owner: str, texts: list[str]) -> None:
        """Before embedding: would this take the owner past their stored-text quota?"""
        if auth.limiter is not None and not owner.startswith(SERVICE_SUBJECT_PREFIX):
            await auth.limiter.check_storage(owner, sum(len(t.encode("utf-8")) for t in texts))

    async def count(stored: Stored) -> None:
        if auth.limiter is not None:
            for owner, delta in stored.bytes_by_owner.items():
                if owner:
                    await auth.limiter.stored(owner, delta)

    @router.post("/documents", dependencies=writer)
    async def add_documents(body: DocumentsIn, request: Request) -> DocumentsOut:
        caller = caller_of(request)
        check_size(len(body.documents), "documents")
        if any(d.shared for d in body.documents) and not (caller.admin or "rag:share" in caller.scopes):
            raise Forbidden(("rag:share",))
        await check_quota(caller.subject, [d.text for d in body.documents])
        stored = await run_in_threadpool(store.add_documents, body.documents, body.collection, caller.subject)
        await count(stored)
        return DocumentsOut(ids=stored.ids, chunks=stored.chunks)

    @router.post("/segments", dependencies=writer)
    async def add_segments(body: SegmentsIn, request: Request) -> DocumentsOut:
        check_size(len(body.segments), "segments")
        owner = caller_of(request).subject
        await check_quota(owner, [s.text for s in body.segments])
        stored = await run_in_threadpool(store.add_segments, body, owner)
        await count(stored)
        return DocumentsOut(ids=stored.ids, chunks=stored.chunks)

    @router.post("/query", dependencies=reader)
    async def query(body: QueryIn, request: Request) -> QueryOut:
        caller = caller_of(request)
        results = await run_in_threadpool(store.query, body, caller)
        if caller.admin:
            others = sorted(
                {str(r.metadata.get("owner")) for r in results if r.metadata.get("owner") != caller.subject}
            )
            if others:
                audit_note(request, "admin_read", owners=others, results=len(results))
        return QueryOut(results=results)

    @router.delete("/documents/{memory_id}", status_code=204, dependencies=writer)
    async def delete(
        memory_id: str, request: Request, collection: Annotated[CollectionName | None, Query()] = None
    ) -> Response:
        try:
            stored = await run_in_threadpool(store.delete, memory_id, collection, caller_of(request))
        except NotFound:
            raise NotFoundError(f"no document, transcript or segment {memory_id!r}") from None
        await count(stored)
        return Response(status_code=204)

    @router.get("/stats", dependencies=reader)
    async def stats(request: Request) -> dict[str, object]:
        counts = await run_in_threadpool(store.stats, caller_of(request))
        return {"collections": counts, "total": sum(counts.values())}

    @router.get("/models", dependencies=reader, response_model=ModelList)
    async def models() -> ModelList:
        return ModelList.of("embeddings", EMBEDDING_MODEL)

    @router.post("/embeddings", dependencies=reader)
    async def embeddings(body: EmbeddingsIn) -> dict[str, object]:
        if body.model != EMBEDDING_MODEL:
            raise NotFoundError(
                f"the model {body.model!r} does not exist; use {EMBEDDING_MODEL!r}", code="model_not_found"
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not text for text in texts):
            raise BadRequest("input must be a non-empty string or a list of non-empty strings", param="input")
        check_size(len(texts), "inputs")
        if body.dimensions is not None and body.dimensions != 384:
            raise BadRequest("this model has 384 dimensions", param="dimensions")
        try:
            vectors, tokens = await run_in_threadpool(store.embed, texts)
        except InputTooLong as exc:
            raise BadRequest(str(exc), param="input", code="context_length_exceeded") from None
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

    return router


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]
