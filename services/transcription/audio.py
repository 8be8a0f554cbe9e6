"""Audio in: decoded by FFmpeg (PyAV) to 16 kHz mono, whatever the file name or MIME type says."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
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


def bytes_for(seconds: float) -> int:
    """The memory ``seconds`` of audio take once decoded (one second of slack, as ``load``)."""
    return int((seconds + 1) * BYTES_PER_SECOND)


class OverBudget(Exception):
    """More decoded audio than the whole budget: it could never be held."""

    def __init__(self, needed: int, total: int) -> None:
        super().__init__(f"decoding this file needs {needed / 1_048_576:.0f} MB; at most {total / 1_048_576:.0f} MB")


class BudgetBusy(Exception):
    """The budget did not free enough in time: other files are being decoded."""


class Held:
    """Bytes taken from a budget until ``release()`` (which may be called twice)."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget, self.nbytes = budget, nbytes

    def release(self) -> None:
        if self.nbytes:
            self._budget.give_back(self.nbytes)
            self.nbytes = 0


class MemoryBudget:
    """The bytes of decoded audio one service process holds at once, shared by every
    upload, job submission and running job: each takes what its stated duration
    needs before decoding, first come first served, and gives it back when its samples
    are no longer needed. Without it, three small files of hours each took 8.6 GB."""

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, nbytes: int, wait_s: float | None) -> Held:
        """``nbytes`` when free (OverBudget if it never can be; BudgetBusy after ``wait_s``)."""
        if nbytes > self.total:
            raise OverBudget(nbytes, self.total)
        if not self._waiting and self.used + nbytes <= self.total:
            self.used += nbytes
            return Held(self, nbytes)
        entry = (nbytes, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(wait_s):
                await entry[1]
        except BaseException as exc:
            granted = entry[1].done() and not entry[1].cancelled()
            if granted:  # given at the moment it gave up: give it back
                self.give_back(nbytes)
            elif entry in self._waiting:
                self._waiting.remove(entry)
                self._wake()
            if isinstance(exc, TimeoutError):
                raise BudgetBusy(f"{self.used / 1_048_576:.0f} MB of audio are being decoded or transcribed") from None
            raise
        return Held(self, nbytes)

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.total:
            nbytes, future = self._waiting.popleft()
            if not future.done():
                self.used += nbytes
                future.set_result(None)


class Decoder:
    """Decodes uploads on threads of lower CPU priority, so that a file being decoded
    (outside any lease) does not slow a chat down on the same cores; every file first
    takes its decoded size from the service's memory budget."""

    def __init__(self, nice: int, budget: MemoryBudget, threads: int = 2) -> None:
        self.budget = budget
        self._pool = ThreadPoolExecutor(threads, "audio-decode", initializer=_lower_priority, initargs=(nice,))

    async def load(
        self, path: Path, max_s: float | None = None, wait_s: float | None = None
    ) -> tuple[np.ndarray, Held]:
        """The samples, and their share of the budget (the caller releases it). The
        share is taken before decoding, from the stated duration (else ``max_s``)."""
        loop = asyncio.get_running_loop()
        stated = await loop.run_in_executor(self._pool, probe_s, path)
        if max_s is not None and stated is not None and stated > max_s:
            raise TooLong(stated, max_s)
        seconds = stated if stated is not None else max_s
        held = await self.budget.take(bytes_for(seconds if seconds is not None else 3600.0), wait_s)
        try:
            return await loop.run_in_executor(self._pool, load, path, max_s), held
        except BaseException:
            held.release()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def duration_s(samples: np.ndarray) -> float:
    return float(samples.size) / SAMPLE_RATE
