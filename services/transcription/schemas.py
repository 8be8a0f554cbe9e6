"""What the transcription routes answer, as OpenAPI describes it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Transcription(BaseModel):
    """``response_format=json``."""

    text: str


class VerboseTranscription(BaseModel):
    """``response_format=verbose_json``; ``words`` with ``timestamp_granularities[]=word``."""

    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[dict[str, Any]]
    words: list[dict[str, Any]] | None = None


class TranscriptDelta(BaseModel):
    """A segment as it is decoded (a stream's events until the last)."""

    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str
    segment: dict[str, Any]


class DurationUsage(BaseModel):
    """OpenAI's usage of a transcription billed by duration."""

    type: Literal["duration"] = "duration"
    seconds: int = Field(description="Seconds of audio, rounded up")


class TranscriptDone(BaseModel):
    """The last event of a stream before ``[DONE]``: the whole text."""

    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: DurationUsage


class JobCreated(BaseModel):
    job_id: str
    state: str
    duration: float = Field(description="Seconds of audio")


class JobSummary(BaseModel):
    job_id: str
    state: str
    progress: float
    file: str
    duration: float
    recorded_at: str
    created_at: float
    indexed: bool
    error: str | None
    index_error: str | None
    yields: int = Field(description="Times the job gave the GPU up to an interactive request")
    owner: str | None
    diarize: bool = Field(description="Whether it labels speakers")
    speakers: list[str] = Field(description="The speakers heard so far: names, or letters in order of first speech")


class JobView(JobSummary):
    segments: list[dict[str, Any]]
    text: str


class JobList(BaseModel):
    jobs: list[JobSummary]


class JobCancelled(BaseModel):
    job_id: str
    state: str = Field(description="cancelled, or cancelling while its window finishes; a final state stays")


class JobEvent(BaseModel):
    """One event of a job's stream: ``snapshot`` (the job as ``GET /jobs/{id}``), then
    ``segment``, ``progress``, ``state``, the final state's own type and ``indexed``."""

    model_config = ConfigDict(extra="allow")

    type: str


class SpeakerView(BaseModel):
    """An enrolled voice: its name, never its audio or its voiceprint."""

    id: str
    object: Literal["speaker"] = "speaker"
    name: str
    created_at: int
    samples: int = Field(description="How many clips its voiceprint was made from")


class SpeakerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SpeakerView]
