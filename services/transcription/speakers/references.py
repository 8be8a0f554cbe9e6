"""Known speakers of a request (``known_speaker_names[]`` with ``known_speaker_references[]``,
as OpenAI's API takes them): checked and decoded before the upload is, so a bad one costs
nothing. Each reference is a data URL of a 2-10 s clip of that voice."""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
from pathlib import Path

import numpy as np

from services.transcription import audio
from shared.errors import BadRequest

MAX_REFERENCES = 4
SHORTEST_S = 2.0
LONGEST_S = 10.0
MAX_NAME = 64
MAX_REFERENCE_BYTES = 2 * 1_048_576
"""A clip of at most 10 s needs no more, in any format a client would send."""
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*;base64,(?P<data>.*)", re.DOTALL)

NAMES, REFERENCES = "known_speaker_names", "known_speaker_references"


def check_names(names: list[str], references: list[str]) -> None:
    """What can be checked without decoding anything."""
    if len(names) != len(references):
        raise BadRequest(
            f"{len(names)} known_speaker_names[] and {len(references)} known_speaker_references[]: "
            "give one reference clip for each name",
            param=NAMES,
        )
    if len(names) > MAX_REFERENCES:
        raise BadRequest(f"at most {MAX_REFERENCES} known speakers", param=NAMES)
    for name in names:
        if not name.strip() or len(name) > MAX_NAME or not name.isprintable():
            raise BadRequest(f"a speaker's name is 1 to {MAX_NAME} printable characters", param=NAMES)
    if len(set(names)) != len(names):
        raise BadRequest("each known speaker's name once", param=NAMES)


def decoded(names: list[str], references: list[str]) -> list[tuple[str, np.ndarray]]:
    """(name, samples) for each known speaker; a 400 naming the field for any that is not
    a data URL of 2-10 s of audio. Blocks (decoding): run it in a thread."""
    check_names(names, references)
    return [
        (name, clip(reference, index)) for index, (name, reference) in enumerate(zip(names, references, strict=True))
    ]


def clip(reference: str, index: int, param: str = REFERENCES) -> np.ndarray:
    where = f"{param}[{index}]"
    match = DATA_URL.fullmatch(reference.strip())
    if match is None:
        raise BadRequest(f"{where} is not a base64 data URL (data:audio/wav;base64,...)", param=param)
    if match["mime"] and not match["mime"].startswith(("audio/", "video/", "application/octet-stream")):
        raise BadRequest(f"{where} is {match['mime']}, not audio", param=param)
    if len(match["data"]) > MAX_REFERENCE_BYTES * 4 // 3 + 4:
        raise BadRequest(f"{where} is larger than {MAX_REFERENCE_BYTES // 1_048_576} MB", param=param)
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64", param=param) from None
    return samples_of(data, where, param)


def samples_of(data: bytes, where: str, param: str) -> np.ndarray:
    """A voice sample's audio, 2-10 s of it."""
    with tempfile.NamedTemporaryFile(suffix=".audio") as file:
        Path(file.name).write_bytes(data)
        try:
            samples = audio.load(Path(file.name), LONGEST_S + 1)
        except audio.TooLong:
            raise BadRequest(f"{where} is longer than {LONGEST_S:g} s", param=param) from None
        except audio.BadAudio as exc:
            raise BadRequest(f"{where}: {exc}", param=param) from None
    seconds = audio.duration_s(samples)
    if seconds < SHORTEST_S or seconds > LONGEST_S:
        raise BadRequest(
            f"{where} lasts {seconds:.1f} s; a voice sample lasts {SHORTEST_S:g} to {LONGEST_S:g} s", param=param
        )
    return samples
