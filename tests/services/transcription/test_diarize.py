"""The diarizer's own rules, with a stand-in encoder (a voice is a tone; its print is the
tone's pitch as a direction): windows, and prints made beside the decoder labelling
exactly as prints made in line; and the real model's prints the same whatever they are
batched with, and the same from its frozen graph as from the eager network. Diarizing
speech is tested through the service (test_speakers.py)."""

from __future__ import annotations

import copy
import itertools

import numpy as np

from services.transcription.speakers.beside import Beside
from services.transcription.speakers.diarize import WINDOW_S, Diarizer, SpeakerState, _spans
from services.transcription.speakers.encoder import CamPlusPlus, load_encoder
from services.transcription.speakers.labeller import JobLabeller, Labeller
from services.transcription.whisper import Piece, Window
from shared.presets import resolve

RATE = 16000
PITCHES = {"low": 150.0, "mid": 400.0, "high": 900.0}


class Tones:
    """Prints from the loudest frequency: one direction per pitch band, so one tone's
    windows cluster together and two tones never do."""

    name = "tones"

    def embed(self, clips: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(clips), 3), dtype=np.float32)
        for row, clip in enumerate(clips):
            spectrum = np.abs(np.fft.rfft(clip))
            pitch = np.argmax(spectrum) * RATE / clip.size
            out[row, int(np.argmin([abs(pitch - p) for p in PITCHES.values()]))] = 1.0
        return out


def tone(pitch: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


def conversation() -> tuple[np.ndarray, list[Piece]]:
    """Turns of three tones; the third piece changes voice half-way, word by word."""
    plan = [("low", 4.0), ("mid", 7.0), ("low", 3.0), ("high", 3.0), ("mid", 5.0)]
    samples = np.concatenate([tone(PITCHES[voice], seconds) for voice, seconds in plan])
    bounds = np.cumsum([0.0] + [seconds for _, seconds in plan])
    pieces = [
        Piece(0, 0, bounds[0], bounds[1], " one"),
        Piece(1, 0, bounds[1], bounds[2], " two"),
        Piece(2, 0, bounds[2], bounds[4], " three four", words=words(bounds[2], bounds[4], 12)),
        Piece(3, 0, bounds[4], bounds[5], " five"),
    ]
    return samples, pieces


def words(start: float, end: float, count: int) -> list[dict[str, float | str]]:
    step = (end - start) / count
    return [{"word": f" w{i}", "start": start + i * step, "end": start + (i + 1) * step} for i in range(count)]


def test_windows_are_side_by_side_never_shorter_than_a_window_inside_a_long_segment() -> None:
    for length in (3.5, 5.9, 6.0, 9.2, 31.0):
        spans = _spans(10.0, 10.0 + length, 100.0)
        assert spans[0][0] == 10.0 and abs(spans[-1][1] - (10.0 + length)) < 1e-9
        assert all(abs(a[1] - b[0]) < 1e-9 for a, b in itertools.pairwise(spans))
        assert all(e - s >= WINDOW_S - 1e-9 for s, e in spans)
    assert np.allclose(_spans(1.0, 1.2, 100.0), [(0.85, 1.35)])  # a short segment's window reaches around it


def test_prints_made_beside_the_decoder_label_as_prints_made_in_line() -> None:
    samples, pieces = conversation()
    diarizer = Diarizer(Tones())
    in_line = diarizer.label(samples, copy.deepcopy(pieces), SpeakerState())

    sent: list[Piece] = []
    labeller = Labeller(diarizer, samples, {}, sent.append)
    for piece in copy.deepcopy(pieces):
        labeller.add(piece)
    labeller.flush()

    assert [(p.speaker, p.start, p.end, p.text) for p in sent] == [(p.speaker, p.start, p.end, p.text) for p in in_line]
    assert [p.speaker for p in sent] == ["A", "B", "A", "C", "B"]  # the third piece cut where the voice changes
    assert [p.id for p in sent] == list(range(5))


def test_a_jobs_windows_come_out_in_order_each_with_the_voices_heard_up_to_it() -> None:
    samples, pieces = conversation()
    diarizer = Diarizer(Tones())
    decoded = [Window(0, pieces[:2], next_seek=1), Window(1, [], next_seek=2), Window(2, pieces[2:], next_seek=3)]
    labelled = list(JobLabeller(diarizer, samples, SpeakerState().to_json(), first_id=7).windows(iter(decoded)))

    assert [w.next_seek for w in labelled] == [1, 2, 3]
    assert [[p.speaker for p in w.pieces] for w in labelled] == [["A", "B"], [], ["A", "C", "B"]]
    assert [p.id for w in labelled for p in w.pieces] == list(range(7, 12))
    heard = [[v["label"] for v in (w.speakers or {})["voices"]] for w in labelled]
    assert heard == [["A", "B"], ["A", "B"], ["A", "B", "C"]]


def test_a_clips_print_does_not_depend_on_what_it_is_batched_with() -> None:
    """Prints made beside the decoder are batched by timing: the labels must not be."""
    folder, _ = resolve("speaker-campplus", "speaker")
    encoder = load_encoder(folder)
    clips = [tone(pitch, 3.0) + tone(pitch * 1.5, 3.0) for pitch in (120.0, 180.0, 240.0, 300.0)]
    together = encoder.embed(clips)
    alone = np.concatenate([encoder.embed([clip]) for clip in clips])
    reversed_ = encoder.embed(clips[::-1])[::-1]
    assert np.array_equal(together, alone) and np.array_equal(together, reversed_)

    beside = Beside(encoder)
    futures = [beside.embed(clips[:1]), beside.embed([]), beside.embed(clips[1:])]
    made = [future.result() for future in futures]
    assert made[1].size == 0
    assert np.array_equal(np.concatenate([made[0], made[2]]), together)


def test_the_frozen_graph_prints_what_the_network_prints_at_every_length() -> None:
    """The graph is traced from one example shape; clips of other lengths and batch sizes
    (and those under half a second, which stay eager) must get the network's prints."""
    folder, _ = resolve("speaker-campplus", "speaker")
    lengths = ((120.0, 0.3), (180.0, 0.5), (240.0, 3.0), (300.0, 7.5))
    clips = [tone(pitch, seconds) + tone(pitch * 1.5, seconds) for pitch, seconds in lengths]
    frozen = load_encoder(folder).embed(clips)
    eager = CamPlusPlus(folder, frozen=False).embed(clips)
    similarity = np.sum(frozen * eager, axis=1)
    assert similarity.min() > 0.9999, similarity
