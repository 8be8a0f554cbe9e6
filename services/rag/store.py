"""Memories in Chroma: documents (chunked) and transcript segments, queried with recency.

Every memory has an owner (the subject it was written for) and may be shared with
everyone. Ids are the owner's: the same id written by two users is two documents
(Chroma's ids carry a tag of the owner). Queries, listings and deletes see the
caller's own memories and shared ones; an admin sees all, memories from before
ownership included (they have no owner, so only admins see them).

Chroma runs embedded on disk, or as a server; embeddings come from the bundled
MiniLM ONNX files through Chroma's own ``ONNXMiniLM_L6_V2`` function, so nothing
is fetched at run time. Every call here blocks; the API runs them in threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import numpy.typing as npt
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.utils.embedding_functions import ONNXMiniLM_L6_V2

from services.rag.chunking import chunk
from services.rag.journal import Change, Journal, Record
from services.rag.settings import RAGSettings
from shared.presets import resolve
from shared.protocol.rag import DocumentIn, QueryIn, Result, Scalar, SegmentsIn
from shared.web import Caller

log = logging.getLogger(__name__)

MAX_TOKENS = 256
"""What MiniLM reads; longer inputs would be truncated."""


class NotFound(Exception):
    pass


class InputTooLong(ValueError):
    pass


class MiniLM(ONNXMiniLM_L6_V2):
    """Chroma's MiniLM function, reading the bundled files instead of downloading.

    One change: Chroma's forward pass pads every input to 256 tokens; this one pads a
    batch of similar lengths to its longest. Attention masks make the padding
    irrelevant, so the vectors are the same (a test checks it against Chroma's own),
    and short texts embed several times faster.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(preferred_providers=["CPUExecutionProvider"])
        self.DOWNLOAD_PATH = folder
        if not (folder / self.EXTRACTED_FOLDER_NAME / "model.onnx").exists():
            raise FileNotFoundError(f"{folder}/onnx/model.onnx is missing; run `baton models fetch`")

    @property
    def for_chroma(self) -> Any:
        """Itself, typed for chromadb (whose generic type does not admit a text-only function)."""
        return self

    @cached_property
    def _batch_tokenizer(self) -> Any:
        tokenizer = self.Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - to the longest in the batch
        return tokenizer

    def _forward(self, documents: list[str], batch_size: int = 32) -> npt.NDArray[np.float32]:
        order = sorted(range(len(documents)), key=lambda i: len(documents[i]))
        out = np.empty((len(documents), 384), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            encoded = self._batch_tokenizer.encode_batch([documents[i] for i in picked])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            hidden = self.model.run(
                None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            )[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
            out[picked] = self._normalize(pooled).astype(np.float32)
        return out

    @cached_property
    def _counter(self) -> Any:
        tokenizer = self.Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer

    @property
    def vocabulary_size(self) -> int:
        return int(self._counter.get_vocab_size())

    def text_of(self, ids: list[int]) -> str:
        """Token ids of this model's vocabulary as the text they spell (special tokens
        left out: the model adds its own)."""
        return str(self._counter.decode(ids, skip_special_tokens=True))

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text before truncation (to refuse inputs MiniLM cannot read whole)."""
        return [len(encoding.ids) for encoding in self._counter.encode_batch(list(texts))]


def open_client(settings: RAGSettings) -> ClientAPI:
    chroma_settings = chromadb.Settings(anonymized_telemetry=False)
    if settings.chroma_url:
        return chromadb.HttpClient(host=settings.chroma_url, settings=chroma_settings)
    settings.chroma_path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(settings.chroma_path), settings=chroma_settings)


def _content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _key(owner: str, local_id: str) -> str:
    """Chroma's id for ``local_id`` of ``owner``."""
    return f"{hashlib.sha256(owner.encode('utf-8')).hexdigest()[:16]}/{local_id}"


def _local(key: str) -> str:
    return key.split("/", 1)[-1]


def _visible(caller: Caller) -> dict[str, Any] | None:
    """The where clause of what ``caller`` may see (None: everything)."""
    if caller.admin:
        return None
    return {"$or": [{"owner": caller.subject}, {"shared": True}]}


def _all_of(*clauses: dict[str, Any] | None) -> dict[str, Any] | None:
    present = [c for c in clauses if c]
    if not present:
        return None
    return present[0] if len(present) == 1 else {"$and": present}


class StoreFailed(Exception):
    """Chroma failed where it should not: the store may be damaged."""


@dataclass
class Stored:
    ids: list[str]
    chunks: int
    bytes_by_owner: dict[str, int] = field(default_factory=dict)
    """Text bytes added (+) or removed (-) per owner, for their storage quota."""


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _bytes_by_owner(metadatas: Sequence[Any] | None) -> dict[str, int]:
    """Text bytes per owner of the chunks and segments found: a document counts its
    text once (its chunks overlap), a segment its own."""
    sizes: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for meta in metadatas or []:
        meta = meta or {}
        owner = str(meta.get("owner", ""))
        if meta.get("kind") == "document":
            if (owner, str(meta.get("doc_id"))) in seen:
                continue
            seen.add((owner, str(meta.get("doc_id"))))
        sizes[owner] = sizes.get(owner, 0) + int(meta.get("doc_bytes", 0) or 0)
    return sizes


class MemoryStore:
    """Chroma behind one write lock, with every record also kept in the journal.

    Embeddings are computed before the write lock is taken, so a big document holds it
    only for Chroma's own insert, not for the model."""

    def __init__(self, client: ClientAPI, embedder: MiniLM, settings: RAGSettings, journal: Journal) -> None:
        self._client = client
        self.embedder = embedder
        self._settings = settings
        self.journal = journal
        self._collections: dict[str, Collection] = {}
        self._write_lock = threading.Lock()
        self.failure: str | None = None
        """Why the last write failed, until one succeeds."""

    @classmethod
    def open(cls, settings: RAGSettings) -> MemoryStore:
        """The store of the service; Busy when another process holds its journal."""
        folder, _ = resolve(settings.embedding_model, "embedding")
        embedder = MiniLM(folder)
        journal = Journal(settings.journal)
        try:
            journal.hold()
            return cls(open_client(settings), embedder, settings, journal)
        except BaseException:
            journal.close()
            raise

    def close(self) -> None:
        self.journal.close()

    def warm_up(self) -> None:
        """Load the model and reach Chroma now, not on the first request; a store from
        before the journal has its records copied into it once."""
        self.embedder(["warm up"])
        self._client.heartbeat()
        self.collection(None)
        if self.journal.fact("imported") is None:
            with self._writing() as change:
                copied = sum(self._copy_into(collection, change) for collection in self._client.list_collections())
                change.set_fact("imported", str(time.time()))
            if copied:
                log.info("records copied into the journal", extra={"records": copied})

    @staticmethod
    def _copy_into(collection: Collection, change: Change, page: int = 1000) -> int:
        copied = 0
        while True:
            found = collection.get(limit=page, offset=copied, include=["documents", "metadatas"])
            if not found["ids"]:
                return copied
            metadatas = [dict(m or {}) for m in found["metadatas"] or []]
            change.put(collection.name, found["ids"], [d or "" for d in found["documents"] or []], metadatas)
            copied += len(found["ids"])

    def restore(self, collection: str, records: Sequence[Record]) -> None:
        """Put journal records back into Chroma (a rebuild), embedding them again."""
        target = self.collection(collection)
        texts = [r.document for r in records]
        self._add(target, None, [r.key for r in records], texts, [r.metadata for r in records], self._vectors(texts))

    def _vectors(self, texts: Sequence[str]) -> list[npt.NDArray[np.float32]]:
        return [np.asarray(v, dtype=np.float32) for v in self.embedder(list(texts))] if texts else []

    def heartbeat(self) -> bool:
        """Ready: Chroma answers, the default collection can be read, and the last write
        did not fail (a damaged store fails writes first)."""
        try:
            self._client.heartbeat()
            self.collection(None).count()
        except Exception:  # any failure means "not ready"
            return False
        return self.failure is None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A failure of Chroma itself while reading: StoreFailed (503), the cause logged."""
        try:
            yield
        except Exception as exc:
            log.error("store read failed", exc_info=exc)
            raise StoreFailed("the memory store failed to read; see the service log") from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Change]:
        """One write at a time, with its journal change (committed only if Chroma took
        it); a failure of Chroma itself (not of the request) is kept, so that /ready
        says so, and answered as StoreFailed (503)."""
        with self._write_lock:
            try:
                with self.journal.change() as change:
                    yield change
            except NotFound:
                raise
            except Exception as exc:
                self.failure = type(exc).__name__
                log.error("store write failed", exc_info=exc)
                raise StoreFailed("the memory store failed to write; see the service log") from None
            self.failure = None

    def collection(self, name: str | None) -> Collection:
        name = name or self._settings.collection
        found = self._collections.get(name)
        if found is None:
            found = self._client.get_or_create_collection(
                name,
                embedding_function=self.embedder.for_chroma,
                configuration={"hnsw": {"space": "cosine"}},
            )
            self._collections[name] = found
        return found

    # -- writes --------------------------------------------------------------------

    def add_documents(self, documents: Sequence[DocumentIn], collection: str | None, owner: str) -> Stored:
        """Chunk and store as ``owner``'s; the same id (or, without an id, the same text)
        adds nothing. A known id with different text replaces that document's chunks."""
        s = self._settings
        target = self.collection(collection)
        now = time.time()
        ids: list[str] = []
        plans: dict[str, tuple[str, list[str], dict[str, Scalar]]] = {}  # doc_id -> hash, chunks, metadata
        for doc in documents:
            digest = _content_hash(doc.text)
            doc_id = doc.id or f"doc-{digest}"
            ids.append(doc_id)
            if doc_id in plans:
                continue
            pieces = chunk(doc.text, s.chunk_size, s.chunk_overlap)
            created = doc.created_at.timestamp() if doc.created_at else now
            base: dict[str, Scalar] = {
                **doc.metadata,
                "kind": "document",
                "doc_id": doc_id,
                "doc_hash": digest,
                "created_at": created,
                "chunks": len(pieces),
                "doc_bytes": _size(doc.text),
                "owner": owner,
                "shared": doc.shared,
            }
            plans[doc_id] = (digest, pieces, base)
        with self._reading():
            known = self._known_hashes(target, owner, list(plans))
        fresh = [doc_id for doc_id, (digest, *_) in plans.items() if known.get(doc_id) != digest]
        vectors = {doc_id: self._vectors(plans[doc_id][1]) for doc_id in fresh}  # the slow part, unlocked
        with self._writing() as change:
            known = self._known_hashes(target, owner, fresh)  # again: another write may have come first
            chunk_ids: list[str] = []
            texts: list[str] = []
            metadatas: list[dict[str, Scalar]] = []
            embeddings: list[npt.NDArray[np.float32]] = []
            removed = 0
            for doc_id in fresh:
                digest, pieces, base = plans[doc_id]
                if known.get(doc_id) == digest:
                    continue
                if doc_id in known:
                    old = target.get(where={"$and": [{"doc_id": doc_id}, {"owner": owner}]}, include=["metadatas"])
                    removed += _bytes_by_owner(old["metadatas"]).get(owner, 0)
                    target.delete(ids=old["ids"])
                    change.remove(target.name, old["ids"])
                chunk_ids += [_key(owner, f"{doc_id}#{index}") for index in range(len(pieces))]
                texts += pieces
                metadatas += [{**base, "chunk": index} for index in range(len(pieces))]
                embeddings += vectors[doc_id]
            self._add(target, change, chunk_ids, texts, metadatas, embeddings)
        added = sum(int(m["doc_bytes"]) for m in metadatas if m["chunk"] == 0)
        return Stored(ids, len(chunk_ids), {owner: added - removed})

    def add_segments(self, batch: SegmentsIn, owner: str) -> Stored:
        target = self.collection(batch.collection)
        recorded = batch.recorded_at.timestamp()
        ids, texts, metadatas = [], [], []
        for segment in batch.segments:
            meta: dict[str, Scalar] = {
                "kind": "segment",
                "doc_id": batch.job_id,
                "job_id": batch.job_id,
                "source": batch.source,
                "start": segment.start,
                "end": segment.end,
                "created_at": recorded + segment.start,
                "doc_hash": _content_hash(segment.text),
                "doc_bytes": _size(segment.text),
                "owner": owner,
                "shared": False,
            }
            if segment.speaker:
                meta["speaker"] = segment.speaker
            segment_id = _key(owner, f"{batch.job_id}@{segment.start:.3f}")
            if segment_id in ids:  # the same start twice in one request: the first one counts
                continue
            ids.append(segment_id)
            texts.append(segment.text)
            metadatas.append(meta)
        with self._reading():
            existing = self._present(target, ids)
        fresh = [i for i, segment_id in enumerate(ids) if segment_id not in existing]
        vectors = dict(zip(fresh, self._vectors([texts[i] for i in fresh]), strict=True))  # unlocked
        with self._writing() as change:
            existing = self._present(target, [ids[i] for i in fresh])
            fresh = [i for i in fresh if ids[i] not in existing]
            self._add(
                target,
                change,
                [ids[i] for i in fresh],
                [texts[i] for i in fresh],
                [metadatas[i] for i in fresh],
                [vectors[i] for i in fresh],
            )
        return Stored([_local(i) for i in ids], len(fresh), {owner: sum(_size(texts[i]) for i in fresh)})

    def _add(
        self,
        target: Collection,
        change: Change | None,
        ids: list[str],
        texts: list[str],
        metadatas: Sequence[dict[str, Any]],
        embeddings: Sequence[npt.NDArray[np.float32]],
    ) -> None:
        step = self._client.get_max_batch_size()
        for start in range(0, len(ids), step):
            end = start + step
            target.add(
                ids=ids[start:end],
                documents=texts[start:end],
                metadatas=metadatas[start:end],  # type: ignore[arg-type]
                embeddings=list(embeddings[start:end]),  # type: ignore[arg-type]
            )
        if change is not None:
            change.put(target.name, ids, texts, metadatas)

    @staticmethod
    def _present(target: Collection, ids: list[str]) -> set[str]:
        return set(target.get(ids=ids, include=[])["ids"]) if ids else set()

    @staticmethod
    def _known_hashes(target: Collection, owner: str, doc_ids: list[str]) -> dict[str, str]:
        """doc_id -> content hash, for ``owner``'s documents already stored (by their first chunk)."""
        if not doc_ids:
            return {}
        found = target.get(ids=[_key(owner, f"{doc_id}#0") for doc_id in doc_ids], include=["metadatas"])
        return {
            str(meta["doc_id"]): str(meta["doc_hash"])
            for meta in (found["metadatas"] or [])
            if meta and "doc_id" in meta
        }

    def delete(self, memory_id: str, collection: str | None, caller: Caller) -> Stored:
        """A document (all its chunks), a transcript (all segments of that job), or one
        segment: the caller's own (an admin's: anyone's); another's is not found."""
        target = self.collection(collection)
        mine = None if caller.admin else {"owner": caller.subject}
        with self._writing() as change:
            found = target.get(where=_all_of({"doc_id": memory_id}, mine), include=["metadatas"])
            if not found["ids"]:
                found = target.get(ids=[_key(caller.subject, memory_id)], include=["metadatas"])
            if not found["ids"]:
                raise NotFound(memory_id)
            target.delete(ids=found["ids"])
            change.remove(target.name, found["ids"])
        removed = _bytes_by_owner(found["metadatas"])
        return Stored([memory_id], len(found["ids"]), {owner: -size for owner, size in removed.items()})

    # -- reads -----------------------------------------------------------------------

    def query(self, request: QueryIn, caller: Caller) -> list[Result]:
        with self._reading():
            return self._query(request, caller)

    def _query(self, request: QueryIn, caller: Caller) -> list[Result]:
        target = self.collection(request.collection)
        bias = self._settings.recency_bias if request.recency_bias is None else request.recency_bias
        # With recency in play, rank a wider set of candidates than asked for.
        wanted = request.top_k if bias == 0 else max(request.top_k * 4, 20)
        # No count() first: it scans the whole collection, and Chroma returns fewer results by itself.
        found = target.query(
            query_texts=[request.query],
            n_results=wanted,
            where=_all_of(self._where(request), _visible(caller)),
            include=["documents", "metadatas", "distances"],
        )
        now = time.time()
        half_life_s = self._settings.recency_half_life_h * 3600
        results = []
        for memory_id, text, meta, distance in zip(
            found["ids"][0],
            (found["documents"] or [[]])[0],
            (found["metadatas"] or [[]])[0],
            (found["distances"] or [[]])[0],
            strict=True,
        ):
            similarity = 1.0 - float(distance)
            age = max(0.0, now - float(meta.get("created_at", now)))  # type: ignore[arg-type]
            recency = 0.5 ** (age / half_life_s)
            score = (1.0 - bias) * similarity + bias * recency
            if not caller.admin:
                meta = {k: v for k, v in meta.items() if k != "owner"}  # a shared one's owner is not theirs to see
            results.append(
                Result(
                    id=_local(memory_id),
                    text=text or "",
                    score=round(score, 6),
                    similarity=round(similarity, 6),
                    recency=round(recency, 6),
                    metadata={k: v for k, v in meta.items() if isinstance(v, str | int | float | bool)},
                )
            )
        results.sort(key=lambda r: r.score, reverse=True)
        return results[: request.top_k]

    @staticmethod
    def _where(request: QueryIn) -> dict[str, Any] | None:
        f = request.filter
        if f is None:
            return None
        clauses: list[dict[str, Any]] = [
            {key: value} for key, value in (("source", f.source), ("speaker", f.speaker), ("job_id", f.job_id)) if value
        ]
        if f.after is not None:
            clauses.append({"created_at": {"$gte": f.after.timestamp()}})
        if f.before is not None:
            clauses.append({"created_at": {"$lte": f.before.timestamp()}})
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    def stats(self, caller: Caller) -> dict[str, int]:
        with self._reading():
            return self._stats(caller)

    def _stats(self, caller: Caller) -> dict[str, int]:
        """Memories per collection: all of them for an admin, else the caller's own and shared ones."""
        where = _visible(caller)
        if where is None:
            return {collection.name: collection.count() for collection in self._client.list_collections()}
        return {
            collection.name: len(collection.get(where=where, include=[])["ids"])
            for collection in self._client.list_collections()
        }

    def texts_of(self, inputs: Sequence[list[int]]) -> list[str]:
        """Token-id inputs as text; InputTooLong names an id past the vocabulary."""
        size = self.embedder.vocabulary_size
        for i, ids in enumerate(inputs):
            if any(token >= size for token in ids):
                raise InputTooLong(f"input {i} holds a token id past this model's vocabulary (0 to {size - 1})")
        return [self.embedder.text_of(ids) for ids in inputs]

    def embed(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int]:
        counts = self.embedder.token_counts(texts)
        too_long = [i for i, n in enumerate(counts) if n > MAX_TOKENS]
        if too_long:
            raise InputTooLong(
                f"input {too_long[0]} has {counts[too_long[0]]} tokens; this model reads at most {MAX_TOKENS}"
            )
        return list(self.embedder(list(texts))), sum(counts)
