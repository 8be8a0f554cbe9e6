"""Prefixes kept in the KV cache as sequences of their own, for the requests that start
with them: a conversation's turns so far, a prompt the service writes for everyone.

When a sequence ends, its cells are given to a cache sequence (``llama_memory_seq_cp``:
the cells are shared, not copied) with the tokens they hold. A new request that starts
with the same tokens takes those cells the same way and prefills only the rest, as
llama.cpp's prompt cache and vLLM's automatic prefix caching do.

Whose cells a request may take: its own subject's, whole; another subject's only as far
as that entry's ``public`` tokens reach (a prompt the service itself wrote, the same for
everyone). So how fast a first token comes never says what another user asked.

Entries are evicted least recently used first, to stay within their budget of cells,
and whenever a running request needs the room (services/llm/engine/batch.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Entry:
    sequence: int
    """The cache sequence that holds the cells."""
    tokens: np.ndarray
    owner: str
    public: int
    """Leading tokens any subject may reuse."""
    used_at: float = field(default_factory=time.monotonic)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    def __init__(self, sequences: list[int], budget_cells: int) -> None:
        self._free = list(sequences)
        self.budget_cells = budget_cells
        self.entries: list[Entry] = []
        self.reused_tokens = 0
        """Prompt tokens requests did not prefill, taken from here."""
        self.hits = 0

    @property
    def cells(self) -> int:
        """Cells the entries hold (counting shared cells once per entry: an upper bound)."""
        return sum(len(e.tokens) for e in self.entries)

    def best(self, tokens: np.ndarray, subject: str) -> tuple[Entry | None, int]:
        """The entry that covers most of ``tokens`` for ``subject``, and how much of it."""
        found: Entry | None = None
        longest = 0
        for entry in self.entries:
            shared = common_prefix(entry.tokens, tokens)
            if entry.owner != subject:
                shared = min(shared, entry.public)
            if shared > longest:
                found, longest = entry, shared
        return found, longest

    def used(self, entry: Entry, tokens: int) -> None:
        entry.used_at = time.monotonic()
        self.hits += 1
        self.reused_tokens += tokens

    def take_slot(self) -> int | None:
        """A free cache sequence, evicting the least recently used entry if there is none."""
        if not self._free and self.entries:
            return self.evict_oldest()
        return self._free.pop() if self._free else None

    def add(self, sequence: int, tokens: np.ndarray, owner: str, public: int) -> Entry:
        entry = Entry(sequence, tokens, owner, public)
        self.entries.append(entry)
        return entry

    def evict_oldest(self, sparing: Entry | None = None) -> int | None:
        """Drop the least recently used entry (other than ``sparing``); returns its
        sequence (its cells are the caller's to free), or None when there is none."""
        candidates = [e for e in self.entries if e is not sparing]
        if not candidates:
            return None
        oldest = min(candidates, key=lambda e: e.used_at)
        self.entries.remove(oldest)
        return oldest.sequence

    def give_back(self, sequence: int) -> None:
        self._free.append(sequence)

    def clear(self) -> list[int]:
        """Forget every entry (a new context); returns their sequences, free again."""
        sequences = [e.sequence for e in self.entries]
        self.entries.clear()
        self._free.extend(sequences)
        return sequences

    def info(self) -> dict[str, Any]:
        return {
            "entries": len(self.entries),
            "cells": self.cells,
            "budget_cells": self.budget_cells,
            "hits": self.hits,
            "reused_tokens": self.reused_tokens,
        }
