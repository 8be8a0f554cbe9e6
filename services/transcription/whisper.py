"""faster-whisper behind one small class. Everything blocks; it runs in a worker
process (worker.py), which the service pauses and resumes as a whole.

Jobs decode resumably. With ``condition_on_previous_text=False``, temperature 0 only
(the fallback samples at random) and no VAD inside the decoder, each decode window
depends only on where it starts (word timestamps move where the next window starts,
but only as a function of this one) (and, for the very first window, on the initial
prompt). Resuming at the start of a window therefore reproduces exactly what an
uninterrupted run decodes from there. A paused worker loses nothing; a worker that
was ended (to free device memory, or because it died) resumes at its checkpoint, the
start of the window it was reading, whose segments are decoded again: one such
interruption costs at most one decode window.

A window is known to be complete only when the next one's first segment arrives
(faster-whisper decodes a whole window, then hands out its segments), so the
stored checkpoint trails the decoder by one window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES
from faster_whisper.vad import VadOptions, get_speech_timestamps

from services.transcription.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

FRAMES_PER_SECOND = 100  # Whisper's mel frames: one every 10 ms


@dataclass
class Piece:
    """One transcript segment, as stored and returned."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    words: list[dict[str, Any]] | None = None
    tokens: list[int] = field(default_factory=list)
    """The segment's token ids (OpenAI's verbose_json segment has them)."""
    temperature: float = 0.0
    """The temperature the segment was decoded at (a fallback raises it)."""
    compression_ratio: float = 0.0
    speaker: str | None = None
    """Who spoke it, when diarized (speakers/diarize.py): a name or a letter."""

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("words", "speaker"):
            if data[optional] is None:
                del data[optional]
        return data


@dataclass
class Window:
    """Segments of one decode window, committed together. ``next_seek``: where
    decoding goes on after it, the checkpoint once this window is stored."""

    seek: int
    pieces: list[Piece]
    next_seek: int = 0
    speakers: dict[str, Any] | None = None
    """The voices heard up to the end of this window (diarized jobs), stored with it."""


class Transcriber:
    def __init__(
        self, path: Path, *, device: str, compute_type: str, threads: int, beam_size: int, chunk_length_s: int
    ) -> None:
        self.path = path
        self.device = device
        self.beam_size = beam_size
        self.chunk_length_s = chunk_length_s
        self._model = WhisperModel(str(path), device=device, compute_type=compute_type, cpu_threads=threads)
        self._lock = threading.Lock()

    @property
    def multilingual(self) -> bool:
        return bool(self._model.model.is_multilingual)

    # -- the device -------------------------------------------------------------

    @property
    def on_device(self) -> bool:
        return bool(self._model.model.model_is_loaded)

    def free_device(self) -> float:
        """Take the weights off the device; returns seconds. From a GPU they move to host
        memory, to come back quickly; on the CPU, where that is a no-op, they are freed
        (and read from disk again when next needed)."""
        with self._lock:
            started = time.monotonic()
            if self._model.model.model_is_loaded:
                self._model.model.unload_model(to_cpu=self.device != "cpu")
            return time.monotonic() - started

    def to_device(self) -> float:
        with self._lock:
            started = time.monotonic()
            if not self._model.model.model_is_loaded:
                self._model.model.load_model()
            return time.monotonic() - started

    # -- interactive ----------------------------------------------------------------

    def transcribe(
        self,
        samples: np.ndarray,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float | None,
        words: bool,
        on_piece: Callable[[Piece], None] | None = None,
    ) -> tuple[list[Piece], dict[str, Any]]:
        """A whole file at once, with voice activity detection (silence gives no segments)."""
        with self._lock:
            if not self._model.model.model_is_loaded:
                self._model.model.load_model()
            segments, info = self._model.transcribe(
                samples,
                language=language or ("en" if not self.multilingual else None),
                initial_prompt=prompt or None,
                temperature=temperature if temperature is not None else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                beam_size=self.beam_size,
                vad_filter=True,
                word_timestamps=words,
            )
            pieces: list[Piece] = []
            for segment in segments:
                piece = self._piece(len(pieces), segment, words)
                pieces.append(piece)
                if on_piece is not None:
                    on_piece(piece)
        return pieces, {"language": info.language, "duration": info.duration}

    # -- resumable jobs -----------------------------------------------------------------

    def windows(
        self,
        samples: np.ndarray,
        *,
        seek: int,
        first_id: int,
        language: str | None,
        prompt: str | None,
        words: bool = False,
    ) -> Iterator[Window]:
        """Complete windows from ``seek`` on (in mel frames). A caller that stops
        early resumes at the last yielded window's ``next_seek``.

        Only speech is decoded, as in interactive requests: voice-activity detection
        runs over the whole file (the same regions every time, so a resumed job decodes
        what an uninterrupted one would), and the regions from ``seek`` on are the clips
        Whisper decodes. A file without speech gives no segments."""
        clips = speech_clips(samples, seek)
        if not clips:
            yield Window(seek, [], next_seek=total_frames(samples))
            return
        with self._lock:
            if not self._model.model.model_is_loaded:
                self._model.model.load_model()
            segments, _ = self._model.transcribe(
                samples,
                language=language or ("en" if not self.multilingual else None),
                initial_prompt=prompt if seek == 0 and prompt else None,
                temperature=0.0,
                beam_size=self.beam_size,
                condition_on_previous_text=False,
                vad_filter=False,
                word_timestamps=words,
                chunk_length=self.chunk_length_s,
                clip_timestamps=clips,
            )
            current = Window(seek, [])
            next_id = first_id
            try:
                for segment in segments:
                    # A segment of a new window means the previous one is complete: hand it
                    # over first, so that stopping here loses only the window just decoded.
                    if segment.seek != current.seek:
                        if current.pieces:
                            current.next_seek = int(segment.seek)
                            yield current
                        current = Window(int(segment.seek), [])
                    current.pieces.append(self._piece(next_id, segment, words))
                    next_id += 1
                current.next_seek = total_frames(samples)
                yield current  # the last one, possibly empty: the end
            finally:
                close = getattr(segments, "close", None)
                if close is not None:
                    close()

    @staticmethod
    def _piece(index: int, segment: Any, words: bool) -> Piece:
        spoken = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in segment.words or []]
        start, end = round(float(segment.start), 3), round(float(segment.end), 3)
        if words and spoken:  # a clip's end can cut a segment short of its last word's end
            start, end = min(start, spoken[0]["start"]), max(end, spoken[-1]["end"])
        return Piece(
            id=index,
            seek=int(segment.seek),
            start=start,
            end=end,
            text=segment.text,
            avg_logprob=round(float(segment.avg_logprob), 4),
            no_speech_prob=round(float(segment.no_speech_prob), 4),
            tokens=[int(t) for t in segment.tokens or []],
            temperature=round(float(segment.temperature or 0.0), 2),
            compression_ratio=round(float(segment.compression_ratio), 4),
            words=spoken if words else None,
        )


LANGUAGES: frozenset[str] = frozenset(_LANGUAGE_CODES)
"""Every language Whisper knows (ISO 639-1 codes and a few more)."""


def check_language(language: str | None, *, multilingual: bool, model_name: str) -> None:
    """ValueError unless the model can transcribe ``language`` (None: detect)."""
    if language is None:
        return
    if language not in _LANGUAGE_CODES:
        raise ValueError(f"unknown language {language!r}; use an ISO 639-1 code such as 'en'")
    if not multilingual and language != "en":
        raise ValueError(f"this model ({model_name}) transcribes English only")


def speech_clips(samples: np.ndarray, seek: int) -> list[float]:
    """Whisper's clip_timestamps (start, end, start, end... in seconds) for the speech
    from mel frame ``seek`` on; empty when none is left."""
    after = seek / FRAMES_PER_SECOND
    clips: list[float] = []
    for region in get_speech_timestamps(samples, VadOptions()):
        start, end = region["start"] / SAMPLE_RATE, region["end"] / SAMPLE_RATE
        if end <= after:
            continue
        clips += [max(start, after), end]
    return clips


def frames_to_seconds(frames: int) -> float:
    return frames / FRAMES_PER_SECOND


def total_frames(samples: np.ndarray) -> int:
    return int(samples.size * FRAMES_PER_SECOND / SAMPLE_RATE)
