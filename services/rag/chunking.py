"""Split text into overlapping chunks, on sentence boundaries where possible."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n{2,}")


def sentences(text: str) -> list[str]:
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


def _split_long(sentence: str, size: int) -> list[str]:
    """A sentence longer than a chunk: split between words (or hard, for no spaces)."""
    pieces: list[str] = []
    current = ""
    for word in sentence.split():
        while len(word) > size:  # a single enormous "word"
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:size])
            word = word[size:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) > size:
            pieces.append(current)
            current = word
        else:
            current = candidate
    if current:
        pieces.append(current)
    return pieces


def chunk(text: str, size: int, overlap: int) -> list[str]:
    """Chunks of at most ``size`` characters; each starts with up to ``overlap``
    characters of whole sentences from the end of the previous one."""
    if size <= 0 or overlap < 0 or overlap >= size:
        raise ValueError("need 0 <= overlap < size")
    units: list[str] = []
    for sentence in sentences(text):
        units.extend(_split_long(sentence, size) if len(sentence) > size else [sentence])
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for unit in units:
        added = len(unit) + (1 if current else 0)
        if current and length + added > size:
            chunks.append(" ".join(current))
            # Carry whole trailing sentences, up to ``overlap`` characters.
            carried: list[str] = []
            carried_length = 0
            for previous in reversed(current):
                extra = len(previous) + (1 if carried else 0)
                if carried_length + extra > overlap or carried_length + extra + len(unit) + 1 > size:
                    break
                carried.insert(0, previous)
                carried_length += extra
            current, length = carried, carried_length
            added = len(unit) + (1 if current else 0)
        current.append(unit)
        length += added
    if current:
        chunks.append(" ".join(current))
    return chunks
