"""Enrolled voices: ``POST /v1/speakers`` (a name and 1-4 samples of 2-10 s; the
voiceprint is kept, never the audio), ``GET /v1/speakers``, ``DELETE /v1/speakers/{id}``.
Each owner's own: another's id is not found. Jobs and uploads of the owner label these
voices by name."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from services.transcription.routes import Owner, TheTranscriber, TheVoices
from services.transcription.schemas import SpeakerList, SpeakerView
from services.transcription.speakers.references import MAX_NAME, MAX_REFERENCES, samples_of
from services.transcription.speakers.voices import VoiceLimit
from shared.errors import BadRequest, NotFound, TooManyRequests

router = APIRouter(prefix="/v1", tags=["speakers"])
MAX_SAMPLE_BYTES = 4 * 1_048_576


async def _samples(files: list[UploadFile]) -> list[Any]:
    if not 1 <= len(files) <= MAX_REFERENCES:
        raise BadRequest(f"1 to {MAX_REFERENCES} samples (file), each 2 to 10 s of the voice", param="file")
    clips = []
    for index, upload in enumerate(files):
        data = await upload.read(MAX_SAMPLE_BYTES + 1)
        if len(data) > MAX_SAMPLE_BYTES:
            raise BadRequest(f"file[{index}] is larger than {MAX_SAMPLE_BYTES // 1_048_576} MB", param="file")
        clips.append(await asyncio.to_thread(samples_of, data, f"file[{index}]", "file"))
    return clips


@router.post("/speakers", response_model=SpeakerView)
async def enrol(
    caller: Owner,
    service: TheTranscriber,
    voices: TheVoices,
    name: Annotated[str, Form(min_length=1, max_length=MAX_NAME)],
    file: Annotated[list[UploadFile], File(description="1 to 4 samples of the voice, 2 to 10 s each")],
) -> dict[str, Any]:
    if not name.strip() or not name.isprintable():
        raise BadRequest("a speaker's name is printable characters", param="name")
    service.job_diarization(True)  # 400 where diarization is not installed
    clips = await _samples(file)
    vector = await service.voiceprint(clips)
    try:
        voice = await voices.add(caller.subject, name.strip(), vector, len(clips))
    except VoiceLimit as exc:
        raise TooManyRequests(str(exc), retry_after_s=None, code="too_many_speakers") from None
    return voice.public()


@router.get("/speakers", response_model=SpeakerList)
async def list_speakers(caller: Owner, voices: TheVoices) -> dict[str, Any]:
    return {"object": "list", "data": [voice.public() for voice in await voices.all(caller.subject)]}


@router.delete("/speakers/{speaker_id}", status_code=204)
async def delete_speaker(speaker_id: str, caller: Owner, voices: TheVoices) -> Response:
    if not await voices.delete(caller.subject, speaker_id):
        raise NotFound(f"no speaker {speaker_id!r}")
    return Response(status_code=204)
