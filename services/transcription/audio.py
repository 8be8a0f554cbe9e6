"""Audio in: decoded by FFmpeg (PyAV) to 16 kHz mono, whatever the file name or MIME type says."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from faster_whisper import decode_audio

SAMPLE_RATE = 16000
FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "opus", "wav", "webm")
"""What clients are told is supported (FFmpeg decodes more)."""


class BadAudio(ValueError):
    """Not audio, corrupt, or empty."""


def describe_formats() -> str:
    return ", ".join(FORMATS)


def load(path: Path) -> np.ndarray:
    """Samples in [-1, 1] at 16 kHz mono; BadAudio if the file does not decode to any."""
    if path.stat().st_size == 0:
        raise BadAudio("the file is empty")
    try:
        samples = decode_audio(str(path), sampling_rate=SAMPLE_RATE)
    except (av.FFmpegError, ValueError, IndexError, StopIteration, RuntimeError) as exc:
        raise BadAudio(f"the file is not audio FFmpeg can decode ({type(exc).__name__})") from None
    if samples.size == 0:
        raise BadAudio("the file holds no audio samples")
    return samples


def duration_s(samples: np.ndarray) -> float:
    return float(samples.size) / SAMPLE_RATE
