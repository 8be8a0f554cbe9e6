"""Answers to deterministic requests, kept for a while and served again without the model.

A request is deterministic when it decodes greedily (temperature 0) or with a fixed
seed. Its key covers the model, the exact prompt messages (a conversation's history
included), every sampling parameter, and the passages retrieved for it; and the caller's
subject whenever the prompt holds something of theirs (a conversation, their memories),
so one user's answer never reaches another. In process, bounded by entries, with a TTL.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.llm.chat.answer import Done
    from services.llm.chat.job import Job
    from services.llm.memories import Passage


@dataclass
class Cached:
    pieces: list[str]
    done: Done


class ResponseCache:
    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Cached]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0

    def key(self, model: str, job: Job, passages: list[Passage]) -> str | None:
        """None when the request may not be cached (it samples at random, or asks for
        log-probabilities, which the cache does not keep)."""
        params = job.params
        if (
            not self.enabled
            or (params.temperature > 0 and params.seed is None)
            or params.logprobs is not None
            or job.raw is not None  # a completion: raw text, not a chat answer
        ):
            return None
        history = job.conversation.history() if job.conversation is not None else []
        personal = job.conversation is not None or any(p.origin == "memory" for p in passages)
        material = {
            "model": model,
            "messages": history + list(job.messages),
            "params": asdict(params),
            "passages": [[p.id, p.text, p.origin] for p in passages],
            "subject": job.subject if personal else None,
            "reveal": job.reveal,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> Cached | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, cached = entry
        if time.monotonic() - stored_at > self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return cached

    def put(self, key: str, pieces: list[str], done: Done) -> None:
        if not self.enabled:
            return
        kept = replace(done, gpu_wait_time=0.0, inference_time=0.0, device="cache", warnings=[])
        self._entries[key] = (time.monotonic(), Cached(list(pieces), kept))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def info(self) -> dict[str, Any]:
        return {"ttl_s": self.ttl_s, "max_entries": self.max_entries, "entries": len(self._entries)}
