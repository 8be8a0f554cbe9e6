"""Memories from the RAG service for the prompt; never a reason for the chat to fail."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from shared.auth import ON_BEHALF_OF
from shared.client import ServiceClient, ServiceUnreachable
from shared.protocol.rag import QueryFilter, QueryIn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: Literal["memory", "request"] = "memory"
    """A memory found by RAG (a source of the answer), or context the request itself gave."""

    def label(self) -> str:
        """Where it came from, in a few words, for the prompt: who spoke first when known
        (``Alice, meeting.ogg at 0:13-0:21, <date>``)."""
        meta = self.metadata
        if meta.get("kind") == "segment":
            span = f"{_clock(meta.get('start', 0))}-{_clock(meta.get('end', meta.get('start', 0)))}"
            where = f"{meta.get('source', 'a recording')} at {span}{_when(meta)}"
            return f"{meta['speaker']}, {where}" if meta.get("speaker") else where
        return str(meta.get("source") or meta.get("title") or meta.get("doc_id") or self.id)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "text": self.text, "metadata": self.metadata}

    def summary(self) -> dict[str, Any]:
        """For callers without scope rag:read: which memory, never what it says."""
        return {"id": self.id, "score": self.score, "title": self.label()}


def sources(passages: list[Passage], reveal: bool) -> list[dict[str, Any]]:
    """An answer's ``sources``: the memories among its passages, whole when the caller
    may read them (``reveal``), else which ones."""
    return [p.public() if reveal else p.summary() for p in passages if p.origin == "memory"]


def _clock(seconds: Any) -> str:
    try:
        total = int(float(seconds))
    except (TypeError, ValueError, OverflowError):
        return "?"
    return f"{total // 60}:{total % 60:02d}"


def _when(meta: dict[str, Any]) -> str:
    """ ", <date> UTC", or nothing for a time no calendar has (a memory stored with a
    far-off recorded_at or start must not break every chat that retrieves it)."""
    try:
        when = datetime.fromtimestamp(float(meta.get("created_at", 0)), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return ""
    return f", {when:%Y-%m-%d %H:%M} UTC"


WORD = re.compile(r"(?<![\w'])([A-Z][a-z]+)(?![\w'])")
_NOT_NAMES = (
    "What Who Whom Whose When Where Why How Which Did Does Do Is Are Was Were Can Could Would Should Will "
    "Tell Please Give Show List Summarize Summarise The A An In On At Of For To From And Or But If I We You "
    "He She They It My Our Your His Her Their This That These Those Any All"
)
NOT_NAMES = frozenset(_NOT_NAMES.split(" "))
"""Capitalised words that begin questions and sentences, never tried as names."""
MAX_NAMES = 3


def named_in(question: str) -> list[str]:
    """The capitalised words of a question that may be a speaker's name (two joined by a
    space or a hyphen are one: "Mary Ann", "Anne-Marie"), at most three: each is tried
    as a speaker filter, and a name no recording has finds nothing."""
    text = question[:2000]
    names: list[tuple[str, int, int]] = []  # (name, words in it, where it ends)
    for match in WORD.finditer(text):
        word = match.group(1)
        if word in NOT_NAMES:
            continue
        if names and names[-1][1] == 1 and text[names[-1][2] : match.start()] in (" ", "-"):
            name, _, end = names.pop()
            names.append((name + text[end : match.start()] + word, 2, match.end()))
        else:
            names.append((word, 1, match.end()))
    found: list[str] = []
    for name, _, _ in names:
        if name not in found:
            found.append(name)
    return found[:MAX_NAMES]


@dataclass
class Lookup:
    passages: list[Passage]
    warning: str | None = None


class Memories:
    """Asks the RAG service with this service's token; gives up after ``timeout_s``."""

    def __init__(self, client: ServiceClient, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s

    async def search(
        self, query: str, top_k: int, filter: QueryFilter | None, recency_bias: float | None, subject: str
    ) -> Lookup:
        """``subject``'s own memories and shared ones: the RAG service is asked for that user.
        A question that names someone who speaks in the caller's recordings ("What did
        Alice say about the budget?") is answered from that speaker's segments alone."""
        if filter is None or filter.speaker is None:
            for name in named_in(query):
                only = (filter or QueryFilter.model_construct()).model_copy(update={"speaker": name})
                spoken = await self._ask(query, top_k, only, recency_bias, subject)
                if spoken.passages or spoken.warning:
                    return spoken
        return await self._ask(query, top_k, filter, recency_bias, subject)

    async def _ask(
        self, query: str, top_k: int, filter: QueryFilter | None, recency_bias: float | None, subject: str
    ) -> Lookup:
        # The embedding model reads 256 tokens; RAG takes queries of up to 4,000 characters.
        # Not validated here: the RAG service does, and its 400 means "answer without".
        asked = QueryIn.model_construct(query=query[:2000], top_k=top_k, filter=filter, recency_bias=recency_bias)
        body = asked.model_dump(mode="json", exclude_none=True, exclude_unset=True)
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.request(
                    "POST", "/v1/query", json=body, idempotent=True, headers={ON_BEHALF_OF: subject}
                )
        except (TimeoutError, ServiceUnreachable) as exc:
            log.warning("RAG unavailable; answering without memories", extra={"error": type(exc).__name__})
            return Lookup([], "memories unavailable (the RAG service did not answer in time); answered without them")
        if response.status_code != 200:
            log.warning("RAG refused the query; answering without memories", extra={"status": response.status_code})
            return Lookup([], f"memories unavailable (the RAG service answered {response.status_code})")
        results = response.json().get("results", [])
        return Lookup([Passage(r["id"], r["text"], float(r["score"]), r.get("metadata") or {}) for r in results])

    async def aclose(self) -> None:
        await self._client.aclose()
