"""Audio in: decoded by FFmpeg (PyAV) to 16 kHz mono, whatever the file name or MIME type says."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 16000
FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "opus", "wav", "webm")
"""What clients are told is supported (FFmpeg decodes more)."""


class BadAudio(ValueError):
    """Not audio, corrupt, or empty."""


def describe_formats() -> str:
    return ", ".join(FORMATS)


class TooLong(Exception):
    """The audio lasts longer than allowed; found before it was all decoded."""

    def __init__(self, seconds: float, limit_s: float) -> None:
        super().__init__(f"the audio lasts {'more than ' if seconds > limit_s else ''}{seconds:.0f} s")
        self.seconds, self.limit_s = seconds, limit_s


BYTES_PER_SECOND = SAMPLE_RATE * 4
"""Memory that decoded audio takes: float32 samples at 16 kHz (about 0.9 GB for 4 h)."""
_GROUP = 500_000  # samples resampled at a time, as faster-whisper's decode_audio does


def probe_s(path: Path) -> float | None:
    """The duration the container states, read without decoding (None if it states none)."""
    if path.stat().st_size == 0:
        raise BadAudio("the file is empty")
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = next(iter(container.streams.audio), None)
            if stream is None:
                raise BadAudio("the file holds no audio stream")
            if container.duration:
                return float(container.duration) / av.time_base
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except (av.FFmpegError, ValueError, IndexError, StopIteration, RuntimeError) as exc:
        raise BadAudio(f"the file is not audio FFmpeg can decode ({type(exc).__name__})") from None
    return None


def load(path: Path, max_s: float | None = None) -> np.ndarray:
    """Samples in [-1, 1] at 16 kHz mono; BadAudio if the file does not decode to any.

    With ``max_s``, a file whose container says it is longer is refused before any
    decoding (TooLong), and decoding stops as soon as more than ``max_s`` came out (a
    container may understate). Samples go straight into one float32 array sized from
    the stated duration: the peak is about BYTES_PER_SECOND per second of audio. The
    samples are those of faster-whisper's ``decode_audio`` (s16 through FFmpeg's
    resampler, then / 32768), so transcripts do not change.
    """
    stated = probe_s(path)
    if max_s is not None and stated is not None and stated > max_s:
        raise TooLong(stated, max_s)
    limit = None if max_s is None else int(max_s * SAMPLE_RATE) + SAMPLE_RATE  # one second of slack
    out = np.empty(int((stated or 60.0) * SAMPLE_RATE) + SAMPLE_RATE, dtype=np.float32)
    filled = 0
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for chunk in _resampled(_grouped(_valid(container.decode(audio=0))), resampler):
                if limit is not None and filled + chunk.size > limit:
                    raise TooLong((filled + chunk.size) / SAMPLE_RATE, float(max_s or 0))
                if filled + chunk.size > out.size:
                    out = np.resize(out, max(out.size * 2, filled + chunk.size))
                out[filled : filled + chunk.size] = chunk.astype(np.float32) / 32768.0
                filled += chunk.size
    except (av.FFmpegError, ValueError, IndexError, StopIteration, RuntimeError) as exc:
        raise BadAudio(f"the file is not audio FFmpeg can decode ({type(exc).__name__})") from None
    if filled == 0:
        raise BadAudio("the file holds no audio samples")
    return out[:filled].copy() if filled < out.size // 2 else out[:filled]


def _valid(frames: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame]:
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def _grouped(frames: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame]:
    fifo = av.AudioFifo()
    for frame in frames:
        frame.pts = None
        fifo.write(frame)
        if fifo.samples >= _GROUP and (group := fifo.read()) is not None:
            yield group
    if fifo.samples > 0 and (rest := fifo.read()) is not None:
        yield rest


def _resampled(frames: Iterator[av.AudioFrame], resampler: av.AudioResampler) -> Iterator[np.ndarray]:
    for frame in _then_none(frames):
        for out in resampler.resample(frame):
            yield out.to_ndarray().reshape(-1)


def _then_none(frames: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame | None]:
    yield from frames
    yield None


def _lower_priority(nice: int) -> None:
    # On Linux a thread's niceness is its own: this lowers only the decoding thread.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)


class Decoder:
    """Decodes uploads on threads of lower CPU priority, so that a file being decoded
    (outside any lease) does not slow a chat down on the same cores."""

    def __init__(self, nice: int, threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(threads, "audio-decode", initializer=_lower_priority, initargs=(nice,))

    async def load(self, path: Path, max_s: float | None = None) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, load, path, max_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def duration_s(samples: np.ndarray) -> float:
    return float(samples.size) / SAMPLE_RATE
