"""Diarization inside a worker process: the model loaded on first use, and the pieces of
a transcript labelled a stretch at a time as they are decoded (about 30 s of speech:
enough windows to cluster, and the stream still moves)."""

from __future__ import annotations

from collections.abc import Callable
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
        self._sent = 0

    def add(self, piece: Piece) -> None:
        self._waiting.append(piece)
        if piece.end - self._waiting[0].start >= STRETCH_S:
            self.flush()

    def flush(self) -> None:
        if not self._waiting:
            return
        for turn in self._diarizer.label(self._samples, self._waiting, self.state):
            turn.id = self._sent
            self._sent += 1
            self._send(turn)
        self._waiting = []


class JobLabeller:
    """A job's windows labelled as they are decoded, from the voices of its checkpoint
    on; each window carries the voices as they stand after it, to be stored with it."""

    def __init__(self, diarizer: Diarizer, samples: np.ndarray, state: dict[str, Any], first_id: int) -> None:
        self._diarizer = diarizer
        self._samples = samples
        self.state = SpeakerState.from_json(state)
        self._next_id = first_id
        """Turns outnumber the decoder's segments: the ids are counted here."""

    def window(self, window: Window) -> Window:
        if window.pieces:
            window.pieces = self._diarizer.label(self._samples, window.pieces, self.state)
            for piece in window.pieces:
                piece.id = self._next_id
                self._next_id += 1
        window.speakers = self.state.to_json()
        return window
