"""The response formats of OpenAI's transcription endpoint."""

from __future__ import annotations

import math
from typing import Any, Literal

from services.transcription.whisper import Piece

Format = Literal["json", "text", "srt", "vtt", "verbose_json", "diarized_json"]
FORMATS: tuple[Format, ...] = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
SHOWS_SPEAKERS: frozenset[str] = frozenset({"verbose_json", "diarized_json", "srt", "vtt"})
"""The formats that can say who spoke (``diarize=true`` with another is refused)."""


def text_of(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces).strip()


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(pieces: list[Piece]) -> str:
    """SubRip; a diarized cue starts with its speaker in brackets."""
    blocks = [
        f"{i}\n{_clock(p.start, ',')} --> {_clock(p.end, ',')}\n{_said(p, '[{}] ')}\n"
        for i, p in enumerate(pieces, start=1)
    ]
    return "\n".join(blocks)


def vtt(pieces: list[Piece]) -> str:
    """WebVTT; a diarized cue is a voice span (``<v Alice>``)."""
    cues = [f"{_clock(p.start, '.')} --> {_clock(p.end, '.')}\n{_said(p, '<v {}>')}\n" for p in pieces]
    return "WEBVTT\n\n" + "\n".join(cues)


def _said(piece: Piece, speaker: str) -> str:
    text = piece.text.strip()
    return text if piece.speaker is None else speaker.format(piece.speaker) + text


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
    """OpenAI's verbose_json segment; ``speaker`` after its fields when diarized."""
    shown = piece.public()
    fields = {name: shown[name] for name in SEGMENT_FIELDS}
    if piece.speaker is not None:
        fields["speaker"] = piece.speaker
    return fields


def usage(seconds: float) -> dict[str, Any]:
    """OpenAI's usage of a transcription billed by duration: whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(seconds)}


def diarized_segment(piece: Piece) -> dict[str, Any]:
    """OpenAI's diarized segment."""
    return {
        "type": "transcript.text.segment",
        "id": f"seg_{piece.id}",
        "start": piece.start,
        "end": piece.end,
        "text": piece.text.strip(),
        "speaker": piece.speaker or "unknown",
    }


def diarized(pieces: list[Piece], seconds: float) -> dict[str, Any]:
    """``response_format=diarized_json``."""
    return {
        "task": "transcribe",
        "duration": round(seconds, 3),
        "text": text_of(pieces),
        "segments": [diarized_segment(p) for p in pieces],
        "usage": usage(seconds),
    }


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
