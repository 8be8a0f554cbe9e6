"""HTTP routes of the transcription service: OpenAI's endpoint, and jobs for long audio.
Module-level functions with typed dependencies: the caller, and the parts the app was
built from (``app.state.parts``), which a test may build with stand-ins."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import StringConstraints

from services.transcription import audio
from services.transcription.errors import ERRORS
from services.transcription.formats import Format
from services.transcription.jobs import FINAL, Job, JobRunner
from services.transcription.parts import Parts
from services.transcription.schemas import (
    JobCancelled,
    JobCreated,
    JobEvent,
    JobList,
    JobView,
    TranscriptDelta,
    TranscriptDone,
    Transcription,
    VerboseTranscription,
)
from services.transcription.speakers.references import MAX_NAME
from services.transcription.speakers.references import decoded as known_speakers
from services.transcription.speakers.voices import Voices
from services.transcription.transcriber import Options, Transcriber, display_name
from shared.errors import BadRequest, Conflict, NotFound
from shared.openapi import answers
from shared.protocol.models import ModelCard, ModelList, found_model
from shared.sse import DONE, ClosingStream, frame
from shared.web import Caller, audit_note, calling, signed_in, stream_slot


def parts(request: Request) -> Parts:
    found: Parts = request.app.state.parts
    return found


def transcriber(request: Request) -> Transcriber:
    return parts(request).transcriber


def runner(request: Request) -> JobRunner:
    return parts(request).runner


def enrolled(request: Request) -> Voices:
    return parts(request).voices


Owner = Annotated[Caller, Depends(calling("transcribe"))]
Runner = Annotated[JobRunner, Depends(runner)]
TheTranscriber = Annotated[Transcriber, Depends(transcriber)]
TheVoices = Annotated[Voices, Depends(enrolled)]

router = APIRouter(prefix="/v1", tags=["transcription"])
user = [Depends(signed_in("transcribe"))]


async def owned(job_id: str, request: Request, caller: Caller, jobs: JobRunner) -> Job:
    """The caller's job; another user's is not found (404, never 403). An admin's read
    of another's job goes to the audit log."""
    job = await jobs.store.get(job_id)
    if job is None or not caller.owns(job.owner):
        raise NotFound(f"no job {job_id!r}")
    if job.owner != caller.subject:
        audit_note(request, "admin_read", owners=[job.owner], job_id=job_id)
    return job


@router.get("/models", dependencies=user, response_model=ModelList)
async def models(service: TheTranscriber) -> ModelList:
    """The model served, then the names accepted for it (whisper-1)."""
    return service.model_list()


@router.get("/models/{model_id:path}", dependencies=user, response_model=ModelCard)
async def model(model_id: str, service: TheTranscriber) -> ModelCard:
    return found_model(service.model_list(), model_id)


@router.post(
    "/audio/transcriptions",
    dependencies=user,
    response_model=None,
    responses=answers(
        "application/json",
        "text/plain",
        "text/event-stream",
        description="The transcript: JSON (json, verbose_json), text (text, srt, vtt) or its stream",
        json=Transcription | VerboseTranscription,
        events=TranscriptDelta | TranscriptDone,
    ),
)
async def transcriptions(
    request: Request,
    caller: Owner,
    service: TheTranscriber,
    voices: TheVoices,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form(min_length=1)],
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[Format, Form()] = "json",
    temperature: Annotated[float | None, Form(ge=0, le=1)] = None,
    granularities: Annotated[list[Literal["word", "segment"]], Form(alias="timestamp_granularities[]")] = [],  # noqa: B006
    stream: Annotated[bool, Form()] = False,
    diarize: Annotated[bool, Form()] = False,
    names: Annotated[list[str], Form(alias="known_speaker_names[]")] = [],  # noqa: B006
    references: Annotated[list[str], Form(alias="known_speaker_references[]")] = [],  # noqa: B006
) -> Response:
    service.check_model(model)
    service.check_diarization(diarize, response_format, bool(names or references))
    speakers = None
    if diarize or response_format == "diarized_json":
        clips = await asyncio.to_thread(known_speakers, names, references)  # before the upload is decoded
        speakers = {"clips": clips, "prints": await voices.known(caller.subject)}
    words = "word" in granularities
    options = Options(service.language(language), prompt, temperature, response_format, words, speakers)
    slot = await stream_slot(request) if stream else None
    return await service.transcribe(file, options, slot)


@router.post("/jobs", status_code=202, response_model=JobCreated)
async def create_job(
    caller: Owner,
    service: TheTranscriber,
    jobs: Runner,
    voices: TheVoices,
    file: Annotated[UploadFile, File()],
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    recorded_at: Annotated[datetime | None, Form()] = None,
    diarize: Annotated[bool | None, Form(description="Label speakers; unset: TRANSCRIPTION_DIARIZE")] = None,
    granularities: Annotated[list[Literal["word", "segment"]], Form(alias="timestamp_granularities[]")] = [],  # noqa: B006
) -> dict[str, Any]:
    language = service.language(language)
    diarized = service.job_diarization(diarize)
    known = await voices.known(caller.subject) if diarized else []
    job_folder = service.settings.data_dir / "jobs"
    job_folder.mkdir(parents=True, exist_ok=True)
    owner, job_id = caller.subject, jobs.new_id()
    await jobs.reserve(owner, job_id)  # before decoding: a user at their limit costs nothing
    held = None
    try:
        path, samples, held = await service.decoded(file)
        kept = job_folder / path.name
        shutil.move(path, kept)
        name, duration = display_name(file.filename), audio.duration_s(samples)
        job = await jobs.submit(
            job_id,
            owner,
            kept,
            name,
            duration,
            language,
            prompt,
            recorded_at,
            samples,
            held,
            diarize=diarized,
            words="word" in granularities,
            known=known,
        )
        held = None  # the runner keeps it with the samples, or gave it back
    except BaseException:
        await jobs.unreserve(owner, job_id)
        raise
    finally:
        if held is not None:
            held.release()
    return {"job_id": job.id, "state": job.state, "duration": job.duration}


@router.get("/jobs", response_model=JobList)
async def list_jobs(
    request: Request, caller: Owner, jobs: Runner, limit: Annotated[int, Query(ge=1, le=200)] = 20
) -> dict[str, Any]:
    found = [job for job in await jobs.store.all() if caller.owns(job.owner)][-limit:]
    others = sorted({str(job.owner) for job in found if job.owner != caller.subject})
    if others:
        audit_note(request, "admin_read", owners=others)
    summaries = [{k: v for k, v in job.public().items() if k not in ("segments", "text")} for job in reversed(found)]
    return {"jobs": summaries}


@router.get("/jobs/{job_id}", response_model=JobView)
async def get_job(job_id: str, request: Request, caller: Owner, jobs: Runner) -> dict[str, Any]:
    return (await owned(job_id, request, caller, jobs)).public()


@router.delete("/jobs/{job_id}", response_model=JobCancelled)
async def cancel_job(job_id: str, request: Request, caller: Owner, jobs: Runner) -> dict[str, Any]:
    await owned(job_id, request, caller, jobs)
    job = await jobs.cancel(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return {"job_id": job.id, "state": job.state if job.state in FINAL else "cancelling"}


SpeakerName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME, pattern=r"^[^\x00-\x1f\x7f]+$")]


@router.patch("/jobs/{job_id}/speakers", response_model=JobView)
async def name_speakers(
    job_id: str,
    request: Request,
    caller: Owner,
    jobs: Runner,
    voices: TheVoices,
    names: Annotated[dict[SpeakerName, SpeakerName], Body(description='Labels to names: {"A": "Alice"}')],
    enrol: Annotated[bool, Query(description="Also enrol each named voice from this job's voiceprint")] = False,
) -> dict[str, Any]:
    job = await owned(job_id, request, caller, jobs)
    if job.state != "done":
        raise Conflict(f"the job is {job.state}; its speakers can be named once it is done", code="job_not_done")
    if not job.indexed and job.index_error is None:  # its memories would be written with the old labels
        raise Conflict(
            "the job's transcript is still being written into memories; name its speakers once it is indexed",
            code="job_indexing",
        )
    heard = {voice["label"]: voice for voice in (job.speakers or {}).get("voices", []) if voice["count"] > 0}
    unknown = sorted(set(names) - set(heard))
    if not names or unknown or len(names) > len(heard):
        raise BadRequest(f"name the job's speakers ({', '.join(heard) or 'none'}), not {unknown}", param="names")
    if enrol:
        for label, name in names.items():
            await voices.add(caller.subject, name.strip(), heard[label]["total"], 1)
    return (await jobs.rename(job, {label: name.strip() for label, name in names.items()})).public()


@router.get("/jobs/{job_id}/events", response_model=None, responses=answers("text/event-stream", events=JobEvent))
async def job_events(job_id: str, request: Request, caller: Owner, jobs: Runner) -> Response:
    await owned(job_id, request, caller, jobs)
    slot = await stream_slot(request)

    async def frames() -> AsyncIterator[str]:
        async with jobs.events.subscribe(job_id) as queue:
            job = await jobs.store.get(job_id)
            if job is None:
                return
            yield frame({"type": "snapshot", **job.public()})
            state: str = job.state
            while state not in FINAL:
                if (event := await queue.get()) is None:
                    return  # cut off (it fell behind) or shutting down: no DONE
                yield frame(event)
                state = str(event.get("state", state))
        yield DONE

    async def give_back(_: bool) -> None:
        await slot.close()

    return ClosingStream(frames(), give_back, ERRORS)
