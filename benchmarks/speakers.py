"""Diarization on the labelled set, on this machine's CPU: DER, speaker count, word error
rate with diarization on and off, and what diarization adds to the wall time.

    .venv/bin/python -m benchmarks.speakers [--per-size 4] [--turns 12] [--repeats 3]

The set (harness/conversations.py): ``--per-size`` conversations each of 2, 3 and 4
espeak-ng voices, with short turns and overlaps, plus the bundled meeting (3 voices).
Each recording is transcribed the way the service's worker does it, in this process:
tiny.en through faster-whisper with voice-activity detection, once plain and once
diarized (word timestamps, then CAM++ voiceprints clustered, services/transcription/
speakers); which goes first alternates. The figures:
- DER (NIST's definition, 0.25 s collar as md-eval's default, overlapped speech scored;
  and without a collar), missed speech, false alarm and confusion;
- the speaker count, right or not;
- WER against the script, diarized and plain;
- diarization's share: (diarized wall time - plain) / diarized wall time, and the ratio
  diarized / plain; each wall time the median of ``--repeats`` runs (one run of each
  varied by up to a quarter on this machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np

from baton.demo.speech import make_speech
from benchmarks.support import save, table
from benchmarks.whisper_gpu import word_error_rate
from harness.conversations import RATE, Conversation, Turn, der, labelled_set
from services.transcription import audio
from services.transcription.speakers.diarize import Diarizer, Thresholds
from services.transcription.speakers.encoder import load_encoder
from services.transcription.speakers.labeller import Labeller
from services.transcription.whisper import Piece, Transcriber
from shared.presets import resolve


def bundled_meeting() -> Conversation:
    """The demo's meeting with its reference: each line's length as make_speech made it."""
    samples = audio.load(make_speech.HERE / "meeting.ogg")
    turns = []
    at = make_speech.GAP_S
    with tempfile.TemporaryDirectory() as tmp:
        for voice, text in make_speech.MEETING:
            seconds = make_speech.speak(voice, text, Path(tmp)).size / RATE
            turns.append(Turn(voice, round(at, 3), round(at + seconds, 3), text))
            at += seconds + make_speech.GAP_S
    return Conversation("bundled meeting", 3, samples, tuple(turns))


def plain(transcriber: Transcriber, samples: np.ndarray) -> tuple[list[Piece], float]:
    ctranslate2.set_random_seed(0)  # as the worker does: the temperature fallback samples
    started = time.perf_counter()
    pieces, _ = transcriber.transcribe(samples, language="en", prompt=None, temperature=None, words=False)
    return pieces, time.perf_counter() - started


def diarized(transcriber: Transcriber, diarizer: Diarizer, samples: np.ndarray) -> tuple[list[Piece], float]:
    ctranslate2.set_random_seed(0)
    started = time.perf_counter()
    pieces: list[Piece] = []
    labeller = Labeller(diarizer, samples, {}, pieces.append)
    transcriber.transcribe(samples, language="en", prompt=None, temperature=None, words=True, on_piece=labeller.add)
    labeller.flush()
    return pieces, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-size", type=int, default=4)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    recordings = [*labelled_set(args.per_size, args.turns), bundled_meeting()]
    whisper_path, _ = resolve("whisper-tiny.en", "whisper")
    speaker_path, _ = resolve("speaker-campplus", "speaker")
    transcriber = Transcriber(
        whisper_path, device="cpu", compute_type="int8", threads=0, beam_size=5, chunk_length_s=30
    )
    diarizer = Diarizer(load_encoder(speaker_path), Thresholds())
    # Warm both paths (model loads, first-call allocations) before timing.
    diarized(transcriber, diarizer, recordings[0].samples)
    rows = [["recording", "s", "voices", "found", "DER", "DER no collar", "miss/FA/conf", "WER on", "WER off", "share"]]
    results: list[dict[str, Any]] = []
    for index, recording in enumerate(recordings):
        samples = recording.samples
        on_times, off_times = [], []
        for repeat in range(args.repeats):
            if (index + repeat) % 2:
                off, off_s = plain(transcriber, samples)
                on, on_s = diarized(transcriber, diarizer, samples)
            else:
                on, on_s = diarized(transcriber, diarizer, samples)
                off, off_s = plain(transcriber, samples)
            on_times.append(on_s)
            off_times.append(off_s)
        on_s, off_s = statistics.median(on_times), statistics.median(off_times)
        reference = [(t.speaker, t.start, t.end) for t in recording.turns]
        hypothesis = [(p.speaker or "?", p.start, p.end) for p in on]
        score, bare = der(reference, hypothesis), der(reference, hypothesis, collar=0.0)
        found = len({p.speaker for p in on})
        wer_on = word_error_rate(recording.text, "".join(p.text for p in on))
        wer_off = word_error_rate(recording.text, "".join(p.text for p in off))
        share = (on_s - off_s) / on_s
        results.append(
            {
                "recording": recording.name,
                "seconds": round(recording.duration, 1),
                "voices": recording.speakers,
                "found": found,
                "der": score.der,
                "der_no_collar": bare.der,
                "missed": score.missed,
                "false_alarm": score.false_alarm,
                "confusion": score.confusion,
                "wer_diarized": wer_on,
                "wer_plain": wer_off,
                "diarized_s": on_s,
                "plain_s": off_s,
                "share": share,
            }
        )
        rows.append(
            [
                recording.name,
                f"{recording.duration:.0f}",
                str(recording.speakers),
                str(found),
                f"{score.der:.1%}",
                f"{bare.der:.1%}",
                f"{score.missed:.1%}/{score.false_alarm:.1%}/{score.confusion:.1%}",
                f"{wer_on:.1%}",
                f"{wer_off:.1%}",
                f"{share:.0%}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    synthetic = [r for r in results if r["recording"] != "bundled meeting"]
    reference_s = sum(r["seconds"] for r in synthetic)
    summary = {
        "der_synthetic": sum(r["der"] * r["seconds"] for r in synthetic) / reference_s,
        "der_synthetic_no_collar": sum(r["der_no_collar"] * r["seconds"] for r in synthetic) / reference_s,
        "count_right": sum(r["found"] == r["voices"] for r in results) / len(results),
        "wer_diarized": statistics.mean(r["wer_diarized"] for r in results),
        "wer_plain": statistics.mean(r["wer_plain"] for r in results),
        "share_median": statistics.median(r["share"] for r in results),
        "diarized_over_plain": sum(r["diarized_s"] for r in results) / sum(r["plain_s"] for r in results),
    }
    print()
    print(table(rows))
    print()
    print(
        f"synthetic set: DER {summary['der_synthetic']:.1%} (no collar {summary['der_synthetic_no_collar']:.1%}); "
        f"speaker count right in {summary['count_right']:.0%} of {len(results)} recordings; "
        f"WER diarized {summary['wer_diarized']:.1%} vs plain {summary['wer_plain']:.1%}; "
        f"diarization's share of the wall time: median {summary['share_median']:.0%}; "
        f"diarized / plain wall time: {summary['diarized_over_plain']:.2f}x"
    )
    print(f"saved {save('speakers', {'args': vars(args), 'summary': summary, 'recordings': results})}")


if __name__ == "__main__":
    main()
