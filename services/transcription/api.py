"""HTTP routes of the transcription service: OpenAI's endpoint, and jobs for long audio."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from services.transcription import audio
from services.transcription.errors import ERRORS
from services.transcription.formats import Format, srt, text_of, verbose, vtt
from services.transcription.jobs import FINAL, Job, JobRunner
from services.transcription.placement import Placement
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
from services.transcription.settings import TranscriptionSettings
from services.transcription.whisper import Piece, check_language
from services.transcription.worker import Work
from shared.errors import BadRequest, NotFound, PayloadTooLarge, ServiceUnavailable
from shared.gpu import HeldLease
from shared.limits import StreamSlot
from shared.metrics import Metrics
from shared.openapi import answers
from shared.protocol.models import ModelList
from shared.sse import DONE, ClosingStream, frame
from shared.web import Auth, audit_note
from shared.web import caller as caller_of

ALIASES = ("whisper-1",)
"""Model names accepted besides the served one (OpenAI clients send whisper-1)."""


def display_name(filename: str | None) -> str:
    """A client's file name as shown back: no control characters (a NUL broke paths),
    valid UTF-8, at most 255 characters."""
    cleaned = "".join(c for c in (filename or "") if c.isprintable())
    return cleaned.encode("utf-8", "replace").decode("utf-8")[:255] or "upload"


class Uploads:
    """Uploaded files on disk, size-checked while copied."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)

    def keep(self, upload: UploadFile, name: str | None = None) -> Path:
        suffix = re.sub(r"[^A-Za-z0-9.]", "", Path(display_name(upload.filename)).suffix)[:10]
        path = self.folder / f"{name or secrets.token_hex(8)}{suffix}"
        written = 0
        with path.open("wb") as out:
            while chunk := upload.file.read(1 << 20):
                written += len(chunk)
                if written > self.max_bytes:
                    out.close()
                    path.unlink(missing_ok=True)
                    raise PayloadTooLarge(f"the file is larger than {self.max_bytes / 1_048_576:g} MB")
                out.write(chunk)
        return path


def build_router(
    placement: Placement,
    runner: JobRunner,
    decoder: audio.Decoder,
    settings: TranscriptionSettings,
    model_id: str,
    auth: Auth,
    metrics: Metrics,
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["transcription"])
    user = [Depends(auth.require("transcribe"))]
    owner = [Depends(auth.caller("transcribe"))]

    @router.get("/models", dependencies=user, response_model=ModelList)
    async def models() -> ModelList:
        """The model served, then the names accepted for it (whisper-1)."""
        return ModelList.of("transcription", model_id, *ALIASES)

    async def owned(job_id: str, request: Request) -> Job:
        """The caller's job; another user's is not found (404, never 403). An admin's
        read of another's job goes to the audit log."""
        caller = caller_of(request)
        job = await runner.store.get(job_id)
        if job is None or not caller.owns(job.owner):
            raise NotFound(f"no job {job_id!r}")
        if job.owner != caller.subject:
            audit_note(request, "admin_read", owners=[job.owner], job_id=job_id)
        return job

    uploads = Uploads(settings.data_dir / "uploads", int(settings.max_upload_mb * 1_048_576))
    speed = metrics.histogram(
        "transcription_interactive_speed_ratio",
        "Audio seconds per second, interactive.",
        buckets=(1, 2, 5, 10, 20, 50, 100, 200),
    )

    async def decoded(upload: UploadFile, name: str | None = None) -> tuple[Path, Any, audio.Held]:
        """The upload kept and decoded, with its share of the memory budget (to release)."""
        path = await asyncio.to_thread(uploads.keep, upload, name)
        try:
            # Refused before decoding if too long; waits for its share of the budget.
            samples, held = await decoder.load(path, settings.max_duration_s, settings.decode_wait_s)
        except audio.TooLong as exc:
            path.unlink(missing_ok=True)
            raise PayloadTooLarge(
                f"{exc}; the limit is {settings.max_duration_s:.0f} s (TRANSCRIPTION_MAX_DURATION_S)",
                code="audio_too_long",
            ) from None
        except audio.OverBudget as exc:
            path.unlink(missing_ok=True)
            raise PayloadTooLarge(f"{exc} (TRANSCRIPTION_DECODE_BUDGET_MB)", code="audio_too_long") from None
        except audio.BudgetBusy as exc:
            path.unlink(missing_ok=True)
            raise ServiceUnavailable(f"{exc}; try again shortly", retry_after_s=5, code="busy") from None
        except audio.BadAudio as exc:
            path.unlink(missing_ok=True)
            raise BadRequest(
                f"{exc}. Supported formats: {audio.describe_formats()}", param="file", code="invalid_audio"
            ) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if audio.duration_s(samples) > settings.max_duration_s:  # a container that understated it
            held.release()
            path.unlink(missing_ok=True)
            raise PayloadTooLarge(
                f"the audio lasts {audio.duration_s(samples):.0f} s; the limit is {settings.max_duration_s:.0f} s "
                "(TRANSCRIPTION_MAX_DURATION_S)",
                code="audio_too_long",
            )
        return path, samples, held

    def valid_language(language: str | None) -> str | None:
        language = language or None
        try:
            check_language(language, multilingual=bool(placement.pool.info.get("multilingual")), model_name=model_id)
        except ValueError as exc:
            raise BadRequest(str(exc), param="language", code="invalid_language") from None
        return language

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
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form(min_length=1)],
        language: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[Format, Form()] = "json",
        temperature: Annotated[float | None, Form(ge=0, le=1)] = None,
        granularities: Annotated[list[Literal["word", "segment"]], Form(alias="timestamp_granularities[]")] = [],  # noqa: B006
        stream: Annotated[bool, Form()] = False,
    ) -> Response:
        if model not in (model_id, *ALIASES):
            raise NotFound(
                f"the model {model!r} does not exist; this service serves {model_id!r}",
                param="model",
                code="model_not_found",
            )
        language = valid_language(language)
        slot = await auth.stream_slot(request) if stream else None
        held: audio.Held | None = None
        streaming = False
        try:
            path, samples, held = await decoded(file)
            path.unlink(missing_ok=True)
            words = "word" in granularities
            work = Work(
                "transcribe",
                samples,
                {"language": language, "prompt": prompt, "temperature": temperature, "words": words},
            )
            wait_s = settings.gpu_wait_ms / 1000
            lease = await placement.acquire("interactive", wait_s)  # not granted: 503 (errors.py)
            if slot is not None:
                streaming = True  # the stream releases the slot and the budget when it ends
                return _stream(placement, lease, work, wait_s, slot, held)
            started = time.monotonic()
            pieces: list[Piece] = []

            async def keep(_: str, piece: Piece) -> None:
                if piece.id >= len(pieces):  # a rerun (after the worker was ended) repeats earlier pieces
                    pieces.append(piece)

            info = await placement.run(
                lambda: work, priority="interactive", wait_s=wait_s, on_message=keep, lease=lease
            )
            speed.observe(audio.duration_s(samples) / max(1e-6, time.monotonic() - started))
            return _render(pieces, info, response_format, words)
        finally:
            if not streaming:
                if held is not None:
                    held.release()
                if slot is not None:
                    await slot.close()

    @router.post("/jobs", status_code=202, dependencies=owner, response_model=JobCreated)
    async def create_job(
        request: Request,
        file: Annotated[UploadFile, File()],
        language: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form()] = None,
        recorded_at: Annotated[datetime | None, Form()] = None,
    ) -> dict[str, Any]:
        language = valid_language(language)
        job_folder = settings.data_dir / "jobs"
        job_folder.mkdir(parents=True, exist_ok=True)
        owner, job_id = caller_of(request).subject, runner.new_id()
        await runner.reserve(owner, job_id)  # before decoding: a user at their limit costs nothing
        held: audio.Held | None = None
        try:
            path, samples, held = await decoded(file)
            kept = job_folder / path.name
            shutil.move(path, kept)
            job = await runner.submit(
                job_id,
                owner,
                kept,
                display_name(file.filename),
                audio.duration_s(samples),
                language,
                prompt,
                recorded_at,
                samples,
                held,
            )
            held = None  # the runner keeps it with the samples, or gave it back
        except BaseException:
            await runner.unreserve(owner, job_id)
            raise
        finally:
            if held is not None:
                held.release()
        return {"job_id": job.id, "state": job.state, "duration": job.duration}

    @router.get("/jobs", dependencies=owner, response_model=JobList)
    async def list_jobs(request: Request, limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
        caller = caller_of(request)
        jobs = [job for job in await runner.store.all() if caller.owns(job.owner)][-limit:]
        others = sorted({str(job.owner) for job in jobs if job.owner != caller.subject})
        if others:
            audit_note(request, "admin_read", owners=others)
        summaries = [{k: v for k, v in job.public().items() if k not in ("segments", "text")} for job in reversed(jobs)]
        return {"jobs": summaries}

    @router.get("/jobs/{job_id}", dependencies=owner, response_model=JobView)
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return (await owned(job_id, request)).public()

    @router.delete("/jobs/{job_id}", dependencies=owner, response_model=JobCancelled)
    async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        await owned(job_id, request)
        job = await runner.cancel(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return {"job_id": job.id, "state": job.state if job.state in FINAL else "cancelling"}

    @router.get(
        "/jobs/{job_id}/events",
        dependencies=owner,
        response_model=None,
        responses=answers("text/event-stream", events=JobEvent),
    )
    async def job_events(job_id: str, request: Request) -> Response:
        await owned(job_id, request)
        slot = await auth.stream_slot(request)

        async def frames() -> AsyncIterator[str]:
            async with runner.events.subscribe(job_id) as queue:
                job = await runner.store.get(job_id)
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

    return router


def _render(pieces: list[Piece], info: dict[str, Any], response_format: str, words: bool) -> Response:
    if response_format == "text":
        return PlainTextResponse(text_of(pieces) + "\n")
    if response_format == "srt":
        return PlainTextResponse(srt(pieces))
    if response_format == "vtt":
        return PlainTextResponse(vtt(pieces), media_type="text/vtt")
    if response_format == "verbose_json":
        return JSONResponse(verbose(pieces, info, words))
    return JSONResponse({"text": text_of(pieces)})


def _stream(
    placement: Placement, lease: HeldLease, work: Work, wait_s: float, slot: StreamSlot, held: audio.Held
) -> Response:
    """Segments as they are decoded (OpenAI's transcript.text.delta events), then the whole text."""
    pieces: asyncio.Queue[Piece | None] = asyncio.Queue()
    seen: list[Piece] = []

    async def hand_over(_: str, piece: Piece) -> None:
        if piece.id >= len(seen):  # a rerun (after the worker was ended) repeats earlier pieces
            seen.append(piece)
            pieces.put_nowait(piece)

    async def run() -> None:
        try:
            await placement.run(lambda: work, priority="interactive", wait_s=wait_s, on_message=hand_over, lease=lease)
        finally:
            pieces.put_nowait(None)

    task = asyncio.create_task(run())

    async def frames() -> AsyncIterator[str]:
        sent = 0
        while (piece := await pieces.get()) is not None:
            sent += 1
            yield frame({"type": "transcript.text.delta", "delta": piece.text, "segment": piece.public()})
        await task  # its failure becomes an error event (errors.py)
        yield frame({"type": "transcript.text.done", "text": text_of(seen[:sent])})
        yield DONE

    async def close(_: bool) -> None:
        if not task.done():
            task.cancel()  # the client left: the worker's request ends, the lease is released
        with contextlib.suppress(BaseException):
            await task
        held.release()
        await slot.close()

    return ClosingStream(frames(), close, ERRORS)
