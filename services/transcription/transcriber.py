"""The transcription service object: an upload kept and decoded within its bounds, the
card taken, the worker run, the transcript rendered or streamed. The routes only read
the form and hand it here; jobs (jobs.py) share the decoding."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from services.transcription import audio
from services.transcription.errors import ERRORS
from services.transcription.formats import (
    SHOWS_SPEAKERS,
    Format,
    diarized,
    diarized_segment,
    srt,
    text_of,
    usage,
    verbose,
    vtt,
)
from services.transcription.placement import Placement
from services.transcription.settings import TranscriptionSettings
from services.transcription.whisper import Piece, check_language
from services.transcription.worker import Work
from shared.errors import BadRequest, NotFound, PayloadTooLarge, ServiceUnavailable
from shared.gpu import HeldLease
from shared.limits import StreamSlot
from shared.metrics import Metrics
from shared.protocol.models import ModelList
from shared.sse import DONE, ClosingStream, frame

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


@dataclass(frozen=True)
class Options:
    """What a request asks of the transcript, checked."""

    language: str | None
    prompt: str | None
    temperature: float | None
    response_format: Format
    words: bool
    speakers: dict[str, Any] | None = None
    """Diarize, with these known voices (``clips``: (name, samples) of reference clips;
    ``prints``: (name, vector) of enrolled voices); None: do not."""


class Transcriber:
    def __init__(
        self,
        placement: Placement,
        decoder: audio.Decoder,
        settings: TranscriptionSettings,
        model_id: str,
        metrics: Metrics,
        model_created: int = 0,
        no_speakers: str | None = None,
    ) -> None:
        self.no_speakers = no_speakers
        """Why this service cannot diarize (no speaker model, or no torch); None if it can."""
        self.placement = placement
        self.decoder = decoder
        self.settings = settings
        self.model_id = model_id
        self.model_created = model_created
        """When the model's files were written (``created`` of its model card)."""
        self.uploads = Uploads(settings.data_dir / "uploads", int(settings.max_upload_mb * 1_048_576))
        self._speed = metrics.histogram(
            "transcription_interactive_speed_ratio",
            "Audio seconds per second, interactive.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200),
        )

    def model_list(self) -> ModelList:
        """The model served, then the names accepted for it (whisper-1)."""
        return ModelList.of("transcription", self.model_id, *ALIASES, created=self.model_created)

    def check_model(self, model: str) -> None:
        if model not in (self.model_id, *ALIASES):
            raise NotFound(
                f"the model {model!r} does not exist; this service serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def language(self, language: str | None) -> str | None:
        """The language asked for, if this model transcribes it ("" or none: detect)."""
        language = language or None
        multilingual = bool(self.placement.pool.info.get("multilingual"))
        try:
            check_language(language, multilingual=multilingual, model_name=self.model_id)
        except ValueError as exc:
            raise BadRequest(str(exc), param="language", code="invalid_language") from None
        return language

    def check_diarization(self, wanted: bool, response_format: str, names: bool) -> None:
        """Refuse what cannot be done, before anything is decoded."""
        if (response_format == "diarized_json" or wanted or names) and self.no_speakers is not None:
            raise BadRequest(self.no_speakers, param="response_format", code="diarization_unavailable")
        if wanted and response_format not in SHOWS_SPEAKERS:
            raise BadRequest(
                f"diarize needs a response_format that shows speakers ({', '.join(sorted(SHOWS_SPEAKERS))})",
                param="diarize",
            )
        if names and not (wanted or response_format == "diarized_json"):
            raise BadRequest(
                "known speakers are for response_format=diarized_json (or diarize=true)", param="known_speaker_names"
            )

    async def voiceprint(self, clips: list[Any]) -> list[float]:
        """One voice's print from clips of it, made by a worker under an interactive lease
        (the model runs where decoding does)."""
        work = Work("voiceprint", np.concatenate(clips), {"lengths": [clip.size for clip in clips]})
        wait_s = self.settings.gpu_wait_ms / 1000
        lease = await self.placement.acquire("interactive", wait_s)  # not granted: 503 (errors.py)

        async def nothing(_: str, __: Any) -> None:
            return None

        vector = await self.placement.run(
            lambda: work, priority="interactive", wait_s=wait_s, on_message=nothing, lease=lease
        )
        return [float(x) for x in vector]

    def job_diarization(self, wanted: bool | None) -> bool:
        """Whether a job labels speakers: as asked, else as the settings say (and only
        where the model is installed: asked for without it, a 400)."""
        if wanted and self.no_speakers is not None:
            raise BadRequest(self.no_speakers, param="diarize", code="diarization_unavailable")
        return (self.settings.diarize if wanted is None else wanted) and self.no_speakers is None

    async def decoded(self, upload: UploadFile, name: str | None = None) -> tuple[Path, Any, audio.Held]:
        """The upload kept and decoded, with its share of the memory budget (to release)."""
        settings = self.settings
        path = await asyncio.to_thread(self.uploads.keep, upload, name)
        try:
            # Refused before decoding if too long; waits for its share of the budget.
            samples, held = await self.decoder.load(path, settings.max_duration_s, settings.decode_wait_s)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            raise _refusal(exc, settings.max_duration_s) from None
        if audio.duration_s(samples) > settings.max_duration_s:  # a container that understated it
            held.release()
            path.unlink(missing_ok=True)
            raise PayloadTooLarge(
                f"the audio lasts {audio.duration_s(samples):.0f} s; the limit is {settings.max_duration_s:.0f} s "
                "(TRANSCRIPTION_MAX_DURATION_S)",
                code="audio_too_long",
            )
        return path, samples, held

    async def transcribe(self, upload: UploadFile, options: Options, slot: StreamSlot | None) -> Response:
        """The whole transcript, or (``slot``: a stream) its segments as they come."""
        held: audio.Held | None = None
        streaming = False
        try:
            path, samples, held = await self.decoded(upload)
            path.unlink(missing_ok=True)
            work = Work(
                "transcribe",
                samples,
                {
                    "language": options.language,
                    "prompt": options.prompt,
                    "temperature": options.temperature,
                    "words": options.words,
                }
                | ({} if options.speakers is None else {"speakers": options.speakers}),
            )
            wait_s = self.settings.gpu_wait_ms / 1000
            lease = await self.placement.acquire("interactive", wait_s)  # not granted: 503 (errors.py)
            if slot is not None:
                streaming = True  # the stream releases the slot and the budget when it ends
                return _stream(self.placement, lease, work, wait_s, slot, held, audio.duration_s(samples), options)
            started = time.monotonic()
            pieces: list[Piece] = []

            async def keep(_: str, piece: Piece) -> None:
                if piece.id >= len(pieces):  # a rerun (after the worker was ended) repeats earlier pieces
                    pieces.append(_asked(piece, options))

            info = await self.placement.run(
                lambda: work, priority="interactive", wait_s=wait_s, on_message=keep, lease=lease
            )
            self._speed.observe(audio.duration_s(samples) / max(1e-6, time.monotonic() - started))
            return _render(pieces, info, options.response_format, options.words, audio.duration_s(samples))
        finally:
            if not streaming:
                if held is not None:
                    held.release()
                if slot is not None:
                    await slot.close()


def _asked(piece: Piece, options: Options) -> Piece:
    """Without the word timestamps that diarization needed but the client did not ask for."""
    if piece.words is not None and not options.words:
        piece.words = None
    return piece


def _refusal(exc: BaseException, max_duration_s: float) -> BaseException:
    """What the client is told when its audio could not be decoded within the bounds."""
    if isinstance(exc, audio.TooLong):
        return PayloadTooLarge(
            f"{exc}; the limit is {max_duration_s:.0f} s (TRANSCRIPTION_MAX_DURATION_S)", code="audio_too_long"
        )
    if isinstance(exc, audio.OverBudget):
        return PayloadTooLarge(f"{exc} (TRANSCRIPTION_DECODE_BUDGET_MB)", code="audio_too_long")
    if isinstance(exc, audio.BudgetBusy):
        return ServiceUnavailable(f"{exc}; try again shortly", retry_after_s=5, code="busy")
    if isinstance(exc, audio.BadAudio):
        return BadRequest(f"{exc}. Supported formats: {audio.describe_formats()}", param="file", code="invalid_audio")
    return exc


def _render(pieces: list[Piece], info: dict[str, Any], response_format: str, words: bool, seconds: float) -> Response:
    if response_format == "text":
        return PlainTextResponse(text_of(pieces) + "\n")
    if response_format == "srt":
        return PlainTextResponse(srt(pieces))
    if response_format == "vtt":
        return PlainTextResponse(vtt(pieces), media_type="text/vtt")
    if response_format == "verbose_json":
        return JSONResponse(verbose(pieces, info | {"duration": seconds}, words))
    if response_format == "diarized_json":
        return JSONResponse(diarized(pieces, seconds))
    return JSONResponse({"text": text_of(pieces), "usage": usage(seconds)})


def _stream(
    placement: Placement,
    lease: HeldLease,
    work: Work,
    wait_s: float,
    slot: StreamSlot,
    held: audio.Held,
    seconds: float,
    options: Options,
) -> Response:
    """Segments as they are decoded (OpenAI's transcript.text.delta events), then the whole text."""
    pieces: asyncio.Queue[Piece | None] = asyncio.Queue()
    seen: list[Piece] = []

    async def hand_over(_: str, piece: Piece) -> None:
        if piece.id >= len(seen):  # a rerun (after the worker was ended) repeats earlier pieces
            seen.append(_asked(piece, options))
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
            if options.response_format == "diarized_json":  # OpenAI's diarized stream: whole segments
                yield frame(diarized_segment(piece))
            else:
                yield frame({"type": "transcript.text.delta", "delta": piece.text, "segment": piece.public()})
        await task  # its failure becomes an error event (errors.py)
        yield frame({"type": "transcript.text.done", "text": text_of(seen[:sent]), "usage": usage(seconds)})
        yield DONE

    async def close(_: bool) -> None:
        if not task.done():
            task.cancel()  # the client left: the worker's request ends, the lease is released
        with contextlib.suppress(BaseException):
            await task
        held.release()
        await slot.close()

    return ClosingStream(frames(), close, ERRORS)
