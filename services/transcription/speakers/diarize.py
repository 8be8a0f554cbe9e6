"""Speaker turns from voiceprints.

Each transcript segment is cut into analysis windows (equal, side by side, 3 s or
more), and each window gets a voiceprint. The windows of one stretch of audio (a job's
decode window, or about 30 s of an upload) are clustered together (average linkage,
cosine), and each cluster joins the voice it is closest to, if close enough, or becomes
a new one: a known voice (enrolled, or a reference clip) by its name, an unknown one by
the next letter, A, B, ... in order of first speech. Each word takes the voice of the window
nearest to it; a run of words too short to tell is given to its neighbour; segments
are cut where the voice changes.

The voices heard so far are the state (``SpeakerState``): plain data, stored with a
job's checkpoint, so a resumed job labels exactly as an uninterrupted one. The same
state, the same windows in the same order, give the same labels."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from services.transcription.speakers.beside import Beside
from services.transcription.speakers.encoder import VoiceEncoder
from services.transcription.whisper import Piece

RATE = 16000
WINDOW_S = 3.0
"""A segment longer than this is cut into windows at least this long, side by side, each
printed from its middle ``WINDOW_S`` (so all batch together). On the labelled set
(benchmarks/speakers.py) 3 s windows told espeak-ng's nearest voices apart where 1.5 s
ones did not; windows of at most 3 s (a 4 s segment cut in two) lost a voice in 4 of 13
recordings; a last window pushed back to full length (so it overlaps) embedded up to
twice the speech for no better DER."""
SHORTEST_S = 0.5
"""A window is never shorter than this (a short segment's window reaches around it)."""
NEW_VOICE_S = 2.5
"""Less speech than this never makes a new voice: it joins the nearest one."""
SHORT_RUN_S = 0.6
"""A run of words shorter than this inside a segment takes its neighbour's voice."""


@dataclass
class Voice:
    label: str
    """What transcripts call it: a name, or a letter."""
    total: list[float]
    """The sum of its windows' voiceprints (its direction is the voice)."""
    count: int = 0
    """Windows heard in it (a known voice starts at 0: named, not yet heard)."""
    known: bool = False
    """Enrolled or given by reference: matched at the known-voice threshold."""

    def centroid(self) -> np.ndarray:
        vector = np.asarray(self.total, dtype=np.float32)
        return vector / max(float(np.linalg.norm(vector)), 1e-9)


@dataclass
class SpeakerState:
    voices: list[Voice] = field(default_factory=list)
    letters: int = 0
    """How many letters were handed out."""

    @classmethod
    def knowing(cls, known: Sequence[tuple[str, np.ndarray | Sequence[float]]]) -> SpeakerState:
        return cls([Voice(name, [float(x) for x in vector], 0, known=True) for name, vector in known])

    def to_json(self) -> dict[str, Any]:
        return {
            "voices": [
                {"label": v.label, "total": [round(x, 6) for x in v.total], "count": v.count, "known": v.known}
                for v in self.voices
            ],
            "letters": self.letters,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SpeakerState:
        if not data:
            return cls()
        return cls([Voice(**v) for v in data.get("voices", [])], int(data.get("letters", 0)))

    def new_voice(self, vector: np.ndarray, count: int) -> Voice:
        label = letter(self.letters)
        self.letters += 1
        voice = Voice(label, [float(x) for x in vector], count)
        self.voices.append(voice)
        return voice


def letter(index: int) -> str:
    """A, B, ..., Z, AA, AB, ..."""
    letters = string.ascii_uppercase
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = letters[rest] + name
    return name


@dataclass(frozen=True)
class Thresholds:
    same: float = 0.75
    """Cosine similarity above which windows, and a cluster and a voice, are one speaker."""
    known: float = 0.7
    """Cosine similarity a cluster needs to take an enrolled or referenced voice's name."""


@dataclass(frozen=True)
class _Window:
    piece: int
    start: float
    end: float

    @property
    def middle(self) -> float:
        return (self.start + self.end) / 2


class Diarizer:
    def __init__(self, encoder: VoiceEncoder, thresholds: Thresholds = Thresholds()) -> None:
        self.encoder = encoder
        self.thresholds = thresholds
        self._beside = Beside(encoder)

    def voiceprint(self, samples: np.ndarray) -> np.ndarray:
        """One voice's print from a clip of it (a reference, an enrolment sample): the
        mean of its windows' prints, normalised."""
        duration = samples.size / RATE
        windows = _spans(0.0, duration, duration)
        clips = [samples[int(s * RATE) : int(e * RATE)] for s, e in windows]
        mean = self.encoder.embed(clips).mean(axis=0)
        return mean / max(float(np.linalg.norm(mean)), 1e-9)

    def enrolment(self, clips: list[np.ndarray]) -> list[float]:
        """One voice's print from several clips of it: the mean of theirs, normalised."""
        mean = np.mean([self.voiceprint(clip) for clip in clips], axis=0)
        return [float(x) for x in mean / max(float(np.linalg.norm(mean)), 1e-9)]

    def known(self, speakers: dict[str, Any]) -> SpeakerState:
        """The voices a recording may be labelled with by name: enrolled prints
        (``prints``: (name, vector)) and reference clips (``clips``: (name, samples))."""
        known = [(name, np.asarray(vector, dtype=np.float32)) for name, vector in speakers.get("prints", [])]
        known += [(name, self.voiceprint(clip)) for name, clip in speakers.get("clips", [])]
        return SpeakerState.knowing(known)

    def prints(self, samples: np.ndarray, pieces: list[Piece]) -> np.ndarray:
        """The voiceprints of ``pieces``' analysis windows, in order: those of a list of
        pieces are those of each piece, one after another (so they may be made as the
        pieces are decoded, and handed to ``label`` later)."""
        clips = _clips(samples, pieces)
        return self.encoder.embed(clips) if clips else np.zeros((0, 0), dtype=np.float32)

    def prints_soon(self, samples: np.ndarray, pieces: list[Piece]) -> Future[np.ndarray]:
        """``prints``, made beside the decoder (beside.py)."""
        return self._beside.embed(_clips(samples, pieces))

    @staticmethod
    def joined(prints: list[np.ndarray]) -> np.ndarray:
        """The prints of several lists of pieces, as those of the lists one after another."""
        parts = [part for part in prints if part.size]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def label(
        self, samples: np.ndarray, pieces: list[Piece], state: SpeakerState, prints: np.ndarray | None = None
    ) -> list[Piece]:
        """``pieces`` cut into speaker turns, each with its ``speaker`` (and each word's);
        ``state`` learns the voices heard. ``prints``: ``self.prints(samples, pieces)``,
        if already made."""
        windows = _windows(samples, pieces)
        if not windows:
            return pieces
        if prints is None:
            prints = self.prints(samples, pieces)
        labels = self._assign(prints, [w.end - w.start for w in windows], state)
        turns: list[Piece] = []
        for index, piece in enumerate(pieces):
            mine = [(w, label) for w, label in zip(windows, labels, strict=True) if w.piece == index]
            turns += _turns(piece, mine)
        return turns

    def _assign(self, prints: np.ndarray, lengths: list[float], state: SpeakerState) -> list[str]:
        labels = [""] * len(prints)
        for members in _clusters(prints, self.thresholds.same):
            total = prints[members].sum(axis=0)
            centroid = total / max(float(np.linalg.norm(total)), 1e-9)
            voice = self._closest(centroid, state, enough=sum(lengths[i] for i in members) >= NEW_VOICE_S)
            if voice is None:
                voice = state.new_voice(total, len(members))
            else:
                voice.total = [a + float(b) for a, b in zip(voice.total, total, strict=True)]
                voice.count += len(members)
            for i in members:
                labels[i] = voice.label
        return labels

    def _closest(self, centroid: np.ndarray, state: SpeakerState, *, enough: bool) -> Voice | None:
        best, best_score = None, -1.0
        for voice in state.voices:
            score = float(voice.centroid() @ centroid)
            if score > best_score:
                best, best_score = voice, score
        if best is None:
            return None
        needed = self.thresholds.known if best.known else self.thresholds.same
        if best_score >= needed or not enough:
            return best
        return None


def _clips(samples: np.ndarray, pieces: list[Piece]) -> list[np.ndarray]:
    """The audio each window's print is made from: its middle ``WINDOW_S`` at most, so
    that prints of windows of any length batch together (encoder.py)."""
    clips = []
    for window in _windows(samples, pieces):
        cut = max(0.0, (window.end - window.start) - WINDOW_S) / 2
        clips.append(samples[int((window.start + cut) * RATE) : int((window.end - cut) * RATE)])
    return clips


def _windows(samples: np.ndarray, pieces: list[Piece]) -> list[_Window]:
    duration = samples.size / RATE
    return [_Window(i, s, e) for i, piece in enumerate(pieces) for s, e in _spans(piece.start, piece.end, duration)]


def _spans(start: float, end: float, duration: float) -> list[tuple[float, float]]:
    """Analysis windows over [start, end], inside the audio: as many equal windows as
    fit ``WINDOW_S``, side by side, so each second of speech is embedded once."""
    start, end = max(0.0, start), min(duration, end)
    if end - start <= WINDOW_S:
        missing = max(0.0, SHORTEST_S - (end - start)) / 2
        return [(max(0.0, start - missing), min(duration, end + missing))] if end > start else []
    count = max(1, math.floor((end - start) / WINDOW_S))
    width = (end - start) / count
    return [(start + k * width, start + (k + 1) * width) for k in range(count)]


def _clusters(prints: np.ndarray, threshold: float) -> list[list[int]]:
    """Average-linkage agglomerative clustering by cosine similarity, merging while the
    closest two clusters are above ``threshold``; clusters in order of first member.
    The similarity of a merged cluster to each other one is the size-weighted mean of
    its parts' (average linkage, updated in place rather than recomputed)."""
    clusters: list[list[int] | None] = [[i] for i in range(len(prints))]
    similarity = (prints @ prints.T).astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    for _ in range(len(prints) - 1):  # each merge leaves one cluster fewer
        found = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
        if similarity[found] <= threshold:
            break
        a, b = int(min(found)), int(max(found))
        first, second = clusters[a], clusters[b]
        assert first is not None and second is not None
        na, nb = len(first), len(second)
        merged = (na * similarity[a] + nb * similarity[b]) / (na + nb)
        similarity[a, :], similarity[:, a] = merged, merged
        similarity[b, :], similarity[:, b] = -np.inf, -np.inf
        similarity[a, a] = -np.inf
        clusters[a], clusters[b] = sorted(first + second), None
    return sorted((c for c in clusters if c is not None), key=lambda members: members[0])


def _turns(piece: Piece, windows: list[tuple[_Window, str]]) -> list[Piece]:
    """The piece cut where its words' voice changes."""
    if not windows:
        return [replace(piece, speaker=None)]
    if not piece.words:
        votes: dict[str, float] = {}
        for window, label in windows:
            votes[label] = votes.get(label, 0.0) + window.end - window.start
        return [replace(piece, speaker=max(votes, key=votes.__getitem__))]
    words = [dict(word) for word in piece.words]
    for word in words:
        middle = (word["start"] + word["end"]) / 2
        word["speaker"] = min(windows, key=lambda item: abs(item[0].middle - middle))[1]
    runs = _smoothed(_runs(words))
    if len(runs) == 1:
        return [replace(piece, speaker=runs[0][0]["speaker"], words=words)]
    return [
        replace(
            piece,
            start=run[0]["start"],
            end=run[-1]["end"],
            text="".join(w["word"] for w in run),
            words=run,
            tokens=[],
            speaker=run[0]["speaker"],
        )
        for run in runs
    ]


def _runs(words: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    runs: list[list[dict[str, Any]]] = []
    for word in words:
        if runs and runs[-1][-1]["speaker"] == word["speaker"]:
            runs[-1].append(word)
        else:
            runs.append([word])
    return runs


def _smoothed(runs: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Runs too short to tell join a neighbour (the longer one), until none is left."""
    while len(runs) > 1:
        lengths = [run[-1]["end"] - run[0]["start"] for run in runs]
        shortest = min(range(len(runs)), key=lengths.__getitem__)
        if lengths[shortest] >= SHORT_RUN_S:
            break
        if shortest == 0:
            neighbour = 1
        elif shortest == len(runs) - 1:
            neighbour = shortest - 1
        else:
            neighbour = shortest - 1 if lengths[shortest - 1] >= lengths[shortest + 1] else shortest + 1
        for word in runs[shortest]:
            word["speaker"] = runs[neighbour][0]["speaker"]
        runs = _runs([word for run in runs for word in run])
    return runs
