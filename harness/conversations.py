"""A labelled set for diarization: conversations of 2, 3 and 4 of espeak-ng's voices,
with short turns and overlaps, each with its reference (who spoke when) and its text;
and the diarization error rate (DER) that compares a hypothesis with a reference.

Made on demand (espeak-ng from Debian, installed as root when missing), never stored:
the same seed makes the same set."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.apt import command
from services.transcription import audio

RATE = audio.SAMPLE_RATE
VOICES = ("en-us", "en-us+f3", "en-us+m7", "en-gb-x-rp+f2")
"""espeak-ng voices that a speaker model tells apart (others, such as en-gb+f4 or
en-us+m3, are en-us with another pitch to it: their voiceprints are the same)."""

LINES = (
    "The project is going well and we should finish the first part on time.",
    "I think the budget needs another review before the end of the month.",
    "Can we talk about the hiring plan at the next meeting?",
    "The deadline moved because the client asked for more changes.",
    "We still have to choose a vendor for the new servers.",
    "The design team finished the mockups for the mobile app yesterday.",
    "Our customers asked for a simpler way to export their reports.",
    "Testing found three bugs in the payment flow last week.",
    "I will send the meeting notes to everyone this afternoon.",
    "The office will be closed on Monday for the holiday.",
    "Marketing wants a short video for the product launch.",
    "Please review the contract before we sign it on Thursday.",
)
SHORT = ("Yes.", "Right.", "Okay, sure.", "No, not yet.", "Good point.", "Exactly.")


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Conversation:
    name: str
    speakers: int
    samples: np.ndarray
    turns: tuple[Turn, ...]

    @property
    def duration(self) -> float:
        return self.samples.size / RATE

    @property
    def text(self) -> str:
        return " ".join(turn.text for turn in self.turns)


def speak(voice: str, text: str, folder: Path) -> np.ndarray:
    wav = folder / "line.wav"
    espeak = command(["espeak-ng"], "espeak-ng")
    subprocess.run([espeak, "-v", voice, "-s", "155", "-w", str(wav), text], check=True, timeout=60)
    return audio.load(wav)


def conversation(name: str, speakers: int, turns: int, seed: int, folder: Path) -> Conversation:
    """``turns`` turns among ``speakers`` voices: about one in four short ("Yes."), one
    in five overlapping the previous turn by 0.3 s, the others after a pause of 0.2 to
    0.8 s. Every voice speaks, and no voice speaks twice in a row."""
    rng = np.random.default_rng(seed)
    voices = VOICES[:speakers]
    order: list[int] = list(range(speakers))
    while len(order) < turns:
        order.append(int(rng.choice([v for v in range(speakers) if v != order[-1]])))
    track = np.zeros(0, dtype=np.float32)
    made: list[Turn] = []
    at = 0.5
    for index, who in enumerate(order):
        short = index >= speakers and rng.random() < 0.25
        text = str(rng.choice(SHORT)) if short else str(rng.choice(LINES))
        speech = _trimmed(speak(voices[who], text, folder))
        if made and not short and rng.random() < 0.2:
            start = max(made[-1].start + 0.5, made[-1].end - 0.3)  # overlapping the previous turn
        elif made:
            start = made[-1].end + float(rng.uniform(0.2, 0.8))
        else:
            start = at
        end = start + speech.size / RATE
        first = round(start * RATE)
        if track.size < first + speech.size:
            track = np.pad(track, (0, first + speech.size - track.size))
        track[first : first + speech.size] += speech
        made.append(Turn(f"voice-{who + 1}", round(start, 3), round(end, 3), text))
    track = np.pad(track, (0, int(0.5 * RATE)))
    return Conversation(name, speakers, np.clip(track, -1, 1), tuple(made))


def _trimmed(speech: np.ndarray) -> np.ndarray:
    """Without espeak-ng's leading and trailing silence, so the reference is the speech."""
    loud = np.flatnonzero(np.abs(speech) > 0.01)
    if loud.size == 0:
        return speech
    return speech[loud[0] : loud[-1] + 1]


def labelled_set(per_size: int = 4, turns: int = 12) -> list[Conversation]:
    """``per_size`` conversations of each of 2, 3 and 4 voices."""
    with tempfile.TemporaryDirectory() as tmp:
        return [
            conversation(f"{size}-voices-{n + 1}", size, turns, seed=100 * size + n, folder=Path(tmp))
            for size in (2, 3, 4)
            for n in range(per_size)
        ]


# -- the diarization error rate --------------------------------------------------------

Span = tuple[str, float, float]
"""(speaker, start s, end s)"""
STEP = 0.01


def _grid(spans: list[Span], speakers: list[str], frames: int) -> np.ndarray:
    grid = np.zeros((len(speakers), frames), dtype=bool)
    for speaker, start, end in spans:
        grid[speakers.index(speaker), round(start / STEP) : round(end / STEP)] = True
    return grid


@dataclass(frozen=True)
class Score:
    der: float
    missed: float
    false_alarm: float
    confusion: float
    speakers_right: bool


def der(reference: list[Span], hypothesis: list[Span], collar: float = 0.25) -> Score:
    """NIST's diarization error rate, frame by frame (10 ms): missed speech, false alarm
    and speaker confusion over the reference's speech, after the best one-to-one mapping
    of hypothesis speakers to reference speakers. ``collar`` seconds around each
    reference boundary are not scored (md-eval's default is 0.25); overlapped speech is."""
    end = max([e for _, _, e in reference + hypothesis] + [0.0])
    frames = round(end / STEP) + 1
    ref_names = sorted({s for s, _, _ in reference})
    hyp_names = sorted({s for s, _, _ in hypothesis})
    ref = _grid(reference, ref_names, frames)
    hyp = _grid(hypothesis, hyp_names, frames)
    scored = np.ones(frames, dtype=bool)
    for _, start, stop in reference:
        for edge in (start, stop):
            scored[max(0, round((edge - collar) / STEP)) : round((edge + collar) / STEP)] = False
    ref, hyp = ref[:, scored], hyp[:, scored]
    n_ref, n_hyp = ref.sum(axis=0), hyp.sum(axis=0)
    total = float(n_ref.sum())
    best_correct = _best_mapping(hyp, ref)
    missed = float(np.maximum(n_ref - n_hyp, 0).sum())
    false_alarm = float(np.maximum(n_hyp - n_ref, 0).sum())
    confusion = float(np.minimum(n_ref, n_hyp).sum()) - best_correct
    if total == 0:
        return Score(0.0, 0.0, 0.0, 0.0, len(hyp_names) == len(ref_names))
    return Score(
        (missed + false_alarm + confusion) / total,
        missed / total,
        false_alarm / total,
        confusion / total,
        len(hyp_names) == len(ref_names),
    )


def _best_mapping(hyp: np.ndarray, ref: np.ndarray) -> float:
    """The most frames a one-to-one mapping of hypothesis speakers onto reference
    speakers gets right (each side's speaker used at most once): a search over the
    subsets of reference speakers already taken, one hypothesis speaker at a time."""
    overlap = (hyp[:, None, :] & ref[None, :, :]).sum(axis=2).astype(float)
    best: dict[int, float] = {0: 0.0}
    for h in range(hyp.shape[0]):
        after = dict(best)
        for taken, score in best.items():
            for r in range(ref.shape[0]):
                if not taken & (1 << r):
                    key = taken | (1 << r)
                    after[key] = max(after.get(key, 0.0), score + overlap[h, r])
        best = after
    return max(best.values())
