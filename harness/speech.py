"""Longer recordings made of the bundled meeting, for tests and benchmarks that need a
job to run long enough to be interrupted, cancelled or followed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from baton.demo.speech.make_speech import write_ogg
from harness.servers import REPO_ROOT
from services.transcription import audio

MEETING = REPO_ROOT / "baton" / "demo" / "speech" / "meeting.ogg"


def long_meeting(folder: Path, repeat: int) -> tuple[Path, float]:
    """The bundled meeting ``repeat`` times over, as one Opus file; (path, seconds)."""
    samples = audio.load(MEETING)
    joined = (np.concatenate([samples] * repeat) * 32767).astype(np.int16)
    path = folder / f"meeting-x{repeat}.ogg"
    write_ogg(joined, path)
    return path, len(joined) / audio.SAMPLE_RATE
