"""Diarization inside a worker process: the model loaded on first use, and the pieces of
a transcript labelled a stretch at a time as they are decoded (about 30 s of speech:
enough windows to cluster, and the stream still moves). Voiceprints are made beside the
decoder as its pieces come (Diarizer.prints_soon); labels wait for the stretch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np

from services.transcription.speakers.diarize import Diarizer, SpeakerState, Thresholds
from services.transcription.speakers.encoder import load_encoder
from services.transcription.whisper import Piece, Window

STRETCH_S = 30.0


class Diarizers:
    """The worker's diarizer, loaded the first time a request asks for one."""

    def __init__(self) -> None:
        self._diarizer: Diarizer | None = None

    def get(self, spec: Any) -> Diarizer:
        if self._diarizer is None:
            if spec.speaker_model is None:
                raise RuntimeError("this service has no speaker model")
            encoder = load_encoder(spec.speaker_model, spec.threads)
            self._diarizer = Diarizer(encoder, Thresholds(same=spec.speaker_same, known=spec.speaker_match))
        return self._diarizer


class Labeller:
    """Takes pieces as they are decoded; hands them on labelled, renumbered from 0."""

    def __init__(
        self,
        diarizer: Diarizer,
        samples: np.ndarray,
        known: dict[str, Any],
        send: Callable[[Piece], None],
    ) -> None:
        """``known``: the voices to label by name (Diarizer.known)."""
        self._diarizer = diarizer
        self._samples = samples
        self._send = send
        self.state = diarizer.known(known)
        self._waiting: list[Piece] = []
        self._prints: list[Future[np.ndarray]] = []
        self._sent = 0

    def add(self, piece: Piece) -> None:
        self._waiting.append(piece)
        self._prints.append(self._diarizer.prints_soon(self._samples, [piece]))
        if piece.end - self._waiting[0].start >= STRETCH_S:
            self.flush()

    def flush(self) -> None:
        if not self._waiting:
            return
        prints = self._diarizer.joined([future.result() for future in self._prints])
        for turn in self._diarizer.label(self._samples, self._waiting, self.state, prints):
            turn.id = self._sent
            self._sent += 1
            self._send(turn)
        self._waiting, self._prints = [], []


class JobLabeller:
    """A job's windows labelled as they are decoded, from the voices of its checkpoint
    on; each window carries the voices as they stand after it, to be stored with it."""

    def __init__(self, diarizer: Diarizer, samples: np.ndarray, state: dict[str, Any], first_id: int) -> None:
        self._diarizer = diarizer
        self._samples = samples
        self.state = SpeakerState.from_json(state)
        self._next_id = first_id
        """Turns outnumber the decoder's segments: the ids are counted here."""

    def windows(self, decoded: Iterable[Window]) -> Iterator[Window]:
        """``decoded``, labelled: each window's prints are made while the next one is
        decoded, so each goes out once the next is decoded (or the decoding ends)."""
        pending: tuple[Window, Future[np.ndarray]] | None = None
        for window in decoded:
            if pending is not None:
                yield self._labelled(*pending)
            pending = (window, self._diarizer.prints_soon(self._samples, window.pieces))
        if pending is not None:
            yield self._labelled(*pending)

    def _labelled(self, window: Window, prints: Future[np.ndarray]) -> Window:
        if window.pieces:
            window.pieces = self._diarizer.label(self._samples, window.pieces, self.state, prints.result())
            for piece in window.pieces:
                piece.id = self._next_id
                self._next_id += 1
        window.speakers = self.state.to_json()
        return window
