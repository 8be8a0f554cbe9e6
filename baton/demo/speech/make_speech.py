"""Make the speech files beside this script with espeak-ng (Debian: apt-get install espeak-ng).

    python baton/demo/speech/make_speech.py

- ``meeting.ogg`` (about two minutes, three voices) and ``meeting.txt``: the bundled
  meeting the demo transcribes, indexes and asks about;
- ``sentence-NN.ogg`` and ``references.json``: short clips with their exact text,
  for word error rate tests.

Audio is 16 kHz mono Opus in Ogg (about 3 KB per second). The texts avoid numerals:
Whisper writes "14th" where a reference would say "fourteenth". Each fact the demo
asks about has a line of its own, so that SmolLM2-135M (the CPU demo's model) can
answer from the one segment that holds it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent
RATE = 16000
GAP_S = 0.6

MEETING = [
    ("en-us", "Good morning everyone. Let's start the weekly planning meeting for the Harbor project."),
    ("en-us+f3", "Thanks. First item is the quarterly report. The finance team needs more time to check the numbers."),
    ("en-us", "So what is the new deadline for the report?"),
    ("en-us+f3", "The deadline for the Harbor report moves to next Friday."),
    ("en-us+m7", "That works for me. Maria will send the draft before then, and I will review it."),
    ("en-us", "Second item is hiring. We are still looking for two backend engineers."),
    ("en-us+m7", "The interviews will run until the end of April, and the design team wants one more designer."),
    ("en-us+f3", "Third item is the office move. We move to the Riverside building in June."),
    ("en-us", "Please pack your desks two weeks before the move, and label every box with your name."),
    ("en-us+m7", "One more thing. The coffee machine on the third floor is broken again."),
    ("en-us+f3", "Facilities promised a new machine next week. Until then, use the kitchen on the second floor."),
    ("en-us", "Great. To sum up, the report is due next Friday, hiring continues, and we move in June. Thank you all."),
]

# Voices chosen by measurement: with tiny.en these three had the lowest error rates
# (4 to 8%) of eight espeak-ng voices tried; British and some variant voices ran 15 to 19%.
SENTENCES = [
    ("en-us", "The quick brown fox jumps over the lazy dog."),
    ("en-us+f3", "Please send the final report to the finance team before the end of the week."),
    ("en-us+m7", "Our new office has a large kitchen and a quiet room for phone calls."),
    ("en-us", "The weather was cold and windy, so we stayed inside and played chess."),
    ("en-us+f3", "She asked whether the meeting could be moved to the afternoon."),
    ("en-us+m7", "Remember to water the plants while I am away on holiday."),
]


def speak(voice: str, text: str, workdir: Path) -> np.ndarray:
    wav = workdir / "line.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "155", "-w", str(wav), text], check=True)
    with av.open(str(wav)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        pieces = [
            frame.to_ndarray().reshape(-1)
            for decoded in container.decode(audio=0)
            for frame in resampler.resample(decoded)
        ]
        pieces += [frame.to_ndarray().reshape(-1) for frame in resampler.resample(None)]
    return np.concatenate(pieces).astype(np.int16)


def write_ogg(samples: np.ndarray, path: Path) -> None:
    with av.open(str(path), "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=RATE, layout="mono")
        stream.bit_rate = 24000
        step = RATE // 50  # 20 ms frames
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.rate = RATE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def main() -> None:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        gap = np.zeros(int(GAP_S * RATE), dtype=np.int16)
        parts: list[np.ndarray] = [gap]
        for voice, text in MEETING:
            parts += [speak(voice, text, workdir), gap]
        meeting = np.concatenate(parts)
        write_ogg(meeting, HERE / "meeting.ogg")
        (HERE / "meeting.txt").write_text(" ".join(text for _, text in MEETING) + "\n")
        references = {}
        for index, (voice, text) in enumerate(SENTENCES, start=1):
            name = f"sentence-{index:02d}.ogg"
            write_ogg(np.concatenate([gap, speak(voice, text, workdir), gap]), HERE / name)
            references[name] = text
        (HERE / "references.json").write_text(json.dumps(references, indent=2) + "\n")
    print(f"meeting: {len(meeting) / RATE:.1f} s; {len(SENTENCES)} sentences")


if __name__ == "__main__":
    main()
