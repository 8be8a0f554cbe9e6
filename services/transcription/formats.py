"""The response formats of OpenAI's transcription endpoint."""

from __future__ import annotations

import math
from typing import Any, Literal

from services.transcription.whisper import Piece

Format = Literal["json", "text", "srt", "vtt", "verbose_json"]
FORMATS: tuple[Format, ...] = ("json", "text", "srt", "vtt", "verbose_json")


def text_of(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces).strip()


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(pieces: list[Piece]) -> str:
    blocks = [
        f"{i}\n{_clock(p.start, ',')} --> {_clock(p.end, ',')}\n{p.text.strip()}\n"
        for i, p in enumerate(pieces, start=1)
    ]
    return "\n".join(blocks)


def vtt(pieces: list[Piece]) -> str:
    cues = [f"{_clock(p.start, '.')} --> {_clock(p.end, '.')}\n{p.text.strip()}\n" for p in pieces]
    return "WEBVTT\n\n" + "\n".join(cues)


SEGMENT_FIELDS = (
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
)
"""OpenAI's verbose_json segment, every field, in its order (strictly typed SDKs need each)."""


def segment(piece: Piece) -> dict[str, Any]:
    shown = piece.public()
    return {name: shown[name] for name in SEGMENT_FIELDS}


def usage(seconds: float) -> dict[str, Any]:
    """OpenAI's usage of a transcription billed by duration: whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(seconds)}


def verbose(pieces: list[Piece], info: dict[str, Any], words: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": info.get("language", "en"),
        "duration": round(float(info.get("duration", 0.0)), 3),
        "text": text_of(pieces),
        "segments": [segment(p) for p in pieces],
    }
    if words:
        body["words"] = [w for p in pieces for w in (p.words or [])]
    body["usage"] = usage(float(info.get("duration", 0.0)))
    return body
