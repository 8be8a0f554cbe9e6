"""The response formats of OpenAI's transcription endpoint."""

from __future__ import annotations

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


def verbose(pieces: list[Piece], info: dict[str, Any], words: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": info.get("language", "en"),
        "duration": round(float(info.get("duration", 0.0)), 3),
        "text": text_of(pieces),
        "segments": [{k: v for k, v in p.public().items() if k != "words"} | {"temperature": 0.0} for p in pieces],
    }
    if words:
        body["words"] = [w for p in pieces for w in (p.words or [])]
    return body
