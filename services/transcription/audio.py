"""Audio in: decoded by FFmpeg (PyAV) to 16 kHz mono, whatever the file name or MIME type says."""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
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


def _lower_priority(nice: int) -> None:
    # On Linux a thread's niceness is its own: this lowers only the decoding thread.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)


class Decoder:
    """Decodes uploads on threads of lower CPU priority, so that a file being decoded
    (outside any lease) does not slow a chat down on the same cores."""

    def __init__(self, nice: int, threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(threads, "audio-decode", initializer=_lower_priority, initargs=(nice,))

    async def load(self, path: Path) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, load, path)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def duration_s(samples: np.ndarray) -> float:
    return float(samples.size) / SAMPLE_RATE
