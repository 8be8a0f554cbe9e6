"""Long transcriptions as jobs: stored in Redis, decoded under a batch lease, resumable.

One task runs the jobs in order, through the placement (placement.py): a worker
process decodes window by window, and after each window the checkpoint (where to go
on, the segments so far) is written to Redis. When the coordinator asks for the GPU,
the worker is paused at once and resumed where it stopped; if it had to be ended (to
free device memory, or because it died) a new one resumes from the checkpoint. A
restarted service resumes unfinished jobs the same way. A finished transcript is
indexed into RAG, retried with backoff while RAG is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from redis.asyncio import Redis

from services.transcription import audio
from services.transcription.placement import HOLDER, Placement
from services.transcription.settings import TranscriptionSettings
from services.transcription.speakers.diarize import SpeakerState
from services.transcription.whisper import Window, total_frames
from services.transcription.worker import Work
from shared.auth import ON_BEHALF_OF
from shared.client import ServiceClient, ServiceUnreachable
from shared.events import EventBus
from shared.limits import Limiter
from shared.metrics import Metrics
from shared.protocol.rag import SegmentIn, SegmentsIn

log = logging.getLogger(__name__)

State = Literal["queued", "running", "paused", "done", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})


class JobMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.jobs = metrics.counter("transcription_jobs_total", "Jobs that ended, by state.", ("state",))
        self.rtf = metrics.histogram(
            "transcription_speed_ratio", "Audio seconds per processing second.", buckets=(1, 2, 5, 10, 20, 50, 100, 200)
        )
        self.index = metrics.counter(
            "transcription_index_attempts_total", "Attempts to index transcripts.", ("outcome",)
        )


@dataclass
class Job:
    id: str
    filename: str
    path: str
    duration: float
    recorded_at: str
    created_at: float
    language: str | None = None
    prompt: str | None = None
    state: State = "queued"
    seek: int = 0
    segments: list[dict[str, Any]] = field(default_factory=list)
    progress: float = 0.0
    indexed: bool = False
    error: str | None = None
    yields: int = 0
    owner: str | None = None
    """The subject that submitted it; None for jobs from before ownership (admins only)."""
    index_error: str | None = None
    """Why RAG refused the transcript for good (the owner's storage quota), if it did."""
    diarize: bool = False
    """Label speakers (segments, words and events carry ``speaker``)."""
    words: bool = False
    """Word timestamps in the segments (diarized jobs have them anyway)."""
    speakers: dict[str, Any] | None = None
    """The voices heard so far (speakers/diarize.py's state), checkpointed with the
    segments so that a resumed job labels exactly as an uninterrupted one."""

    @property
    def text(self) -> str:
        return "".join(s["text"] for s in self.segments).strip()

    def public(self) -> dict[str, Any]:
        return {
            "job_id": self.id,
            "state": self.state,
            "progress": round(self.progress, 4),
            "file": self.filename,
            "duration": self.duration,
            "recorded_at": self.recorded_at,
            "created_at": self.created_at,
            "segments": self.segments,
            "text": self.text,
            "indexed": self.indexed,
            "error": self.error,
            "index_error": self.index_error,
            "yields": self.yields,
            "owner": self.owner,
            "diarize": self.diarize,
            "speakers": [v["label"] for v in (self.speakers or {}).get("voices", []) if v["count"] > 0],
        }


class JobStore:
    """Jobs in Redis: one hash per job, a sorted set of ids by creation time."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    async def save(self, job: Job) -> None:
        data: dict[Any, Any] = {k: json.dumps(v) for k, v in asdict(job).items()}
        await self._redis.hset(self._key(job.id), mapping=data)
        await self._redis.zadd(f"{self._prefix}jobs", {job.id: job.created_at})

    async def checkpoint(self, job: Job) -> None:
        """The fields that change while decoding, in one write."""
        fields = {
            "seek": job.seek,
            "segments": job.segments,
            "progress": job.progress,
            "state": job.state,
            "yields": job.yields,
            "speakers": job.speakers,
        }
        data: dict[Any, Any] = {k: json.dumps(v) for k, v in fields.items()}
        await self._redis.hset(self._key(job.id), mapping=data)

    async def get(self, job_id: str) -> Job | None:
        raw = await self._redis.hgetall(self._key(job_id))
        if not raw:
            return None
        return Job(**{_text(k): json.loads(v) for k, v in raw.items()})

    async def all(self) -> list[Job]:
        ids = await self._redis.zrange(f"{self._prefix}jobs", 0, -1)
        jobs = [await self.get(_text(i)) for i in ids]
        return [j for j in jobs if j is not None]


def _for_good(response: httpx.Response) -> bool:
    """A refusal that retrying will not change: a 4xx other than a rate limit."""
    if response.status_code in (401, 403, 408, 409, 425):  # the services' configuration, or a race
        return False
    if response.status_code == 429:
        return "retry-after" not in response.headers  # a quota, not a rate
    return 400 <= response.status_code < 500


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return f"RAG answered {response.status_code}"


def _remove(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        placement: Placement,
        rag: ServiceClient,
        settings: TranscriptionSettings,
        metrics: JobMetrics,
        decoder: audio.Decoder,
        limiter: Limiter | None = None,
    ) -> None:
        self.store = store
        self._limiter = limiter
        self._decoder = decoder
        self.events = EventBus()
        """Each job's events, its id the topic."""
        self._placement = placement
        self._rag = rag
        self._settings = settings
        self._metrics = metrics
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._cancelled: set[str] = set()
        self._running: str | None = None
        self._current: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._decoded: dict[str, tuple[Any, audio.Held]] = {}  # the job about to run, decoded at submission

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Resume what a previous process left: unfinished jobs, unindexed transcripts."""
        for job in await self.store.all():
            if job.state not in FINAL:
                log.info("resuming job", extra={"job_id": job.id, "seek": job.seek, "segments": len(job.segments)})
                await self._queue.put(job.id)
            elif job.state == "done" and not job.indexed:
                self._spawn(self._index(job))
        self._worker = asyncio.create_task(self._work(), name="transcription-jobs")

    async def stop(self) -> None:
        for task in [self._worker, self._current, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._worker, self._current, *self._tasks]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- API --------------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return f"job-{secrets.token_hex(8)}"

    async def reserve(self, owner: str, job_id: str) -> None:
        """Count ``job_id`` against its owner's queued jobs (429 when they have too many);
        the count ends with the job, or with ``unreserve`` if it is never submitted."""
        if self._limiter is not None:
            await self._limiter.take_job(owner, job_id)

    async def unreserve(self, owner: str, job_id: str) -> None:
        if self._limiter is not None:
            await self._limiter.end_job(owner, job_id)

    async def submit(
        self,
        job_id: str,
        owner: str,
        path: Path,
        filename: str,
        duration: float,
        language: str | None,
        prompt: str | None,
        recorded_at: datetime | None,
        samples: Any = None,
        held: audio.Held | None = None,
        *,
        diarize: bool = False,
        words: bool = False,
        known: list[tuple[str, list[float]]] | None = None,
    ) -> Job:
        """Queue a job; ``samples``, if given, spare the worker decoding the file again.
        Their share of the memory budget (``held``) is the runner's once this returns."""
        job = Job(
            id=job_id,
            filename=filename,
            path=str(path),
            duration=round(duration, 3),
            recorded_at=(recorded_at or datetime.now(UTC)).isoformat(),
            created_at=time.time(),
            language=language,
            prompt=prompt,
            owner=owner,
            diarize=diarize,
            words=words,
            # The owner's enrolled voices as they were at submission: a resumed job
            # labels as it began, whatever is enrolled or deleted meanwhile.
            speakers=SpeakerState.knowing(known or []).to_json() if diarize else None,
        )
        await self.store.save(job)
        if samples is not None and held is not None and self._running is None and self._queue.empty():
            self._decoded[job.id] = (samples, held)  # it runs next: no need to decode the file again
        elif held is not None:
            held.release()
        await self._queue.put(job.id)
        log.info("job queued", extra={"job_id": job.id, "duration": job.duration})
        return job

    async def cancel(self, job_id: str) -> Job | None:
        job = await self.store.get(job_id)
        if job is None or job.state in FINAL:
            return job
        self._cancelled.add(job_id)
        if self._running == job_id and self._current is not None:
            self._current.cancel()  # ends its worker's request at once, or its wait for the GPU
        else:  # queued behind another job: end it here
            job.state = "cancelled"
            await self.store.save(job)
            self._finished(job)
        return job

    async def rename(self, job: Job, names: dict[str, str]) -> Job:
        """A finished job's speakers named afterwards (``{"A": "Alice"}``): its segments,
        their words and its voices; its memories are written again with the names. Only
        once its memories were written (or refused): the indexer saves its own copy of
        the job, so a rename during indexing would be lost (the route answers 409)."""
        for segment in job.segments:
            segment["speaker"] = names.get(segment.get("speaker", ""), segment.get("speaker"))
            for word in segment.get("words") or []:
                word["speaker"] = names.get(word.get("speaker", ""), word.get("speaker"))
        for voice in (job.speakers or {}).get("voices", []):
            if voice["label"] in names:
                voice["label"], voice["known"] = names[voice["label"]], True
        job.indexed, job.index_error = False, None
        await self.store.save(job)
        self._spawn(self._reindex(job))
        return job

    async def _reindex(self, job: Job) -> None:
        """The transcript's memories replaced: removed, then indexed as they now read."""
        owner = job.owner or HOLDER
        while True:
            try:
                response = await self._rag.request(
                    "DELETE", f"/v1/documents/{job.id}", idempotent=True, headers={ON_BEHALF_OF: owner}
                )
                if response.status_code in (204, 404):
                    break
                if _for_good(response):  # refused for good: say so, as indexing does
                    job.index_error = _message(response)
                    await self.store.save(job)
                    return
            except ServiceUnreachable:
                pass
            await asyncio.sleep(self._settings.index_retry_max_s)
        await self._index(job)

    # -- the worker ---------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            job = await self.store.get(job_id)
            if job is None or job.state in FINAL or job_id in self._cancelled:
                if (skipped := self._decoded.pop(job_id, None)) is not None:
                    skipped[1].release()
                continue
            self._running = job_id
            self._current = asyncio.create_task(self._run(job), name=f"job-{job_id}")
            try:
                await asyncio.wait({self._current})
                if self._current.cancelled():
                    job.state = "cancelled"
                    await self.store.save(job)
                    self._finished(job)
                elif (exc := self._current.exception()) is not None:
                    log.error("job failed", extra={"job_id": job_id}, exc_info=exc)
                    # The cause is in the log; the user gets no internal detail (paths, addresses).
                    job.state, job.error = "failed", "the transcription failed; the service log has the cause"
                    await self.store.save(job)
                    self._finished(job)
            finally:
                self._running = None
                self._current = None

    async def _run(self, job: Job) -> None:
        """The job, holding its samples' share of the memory budget while it runs."""
        kept = self._decoded.pop(job.id, None)
        samples, held = kept if kept is not None else await self._decoder.load(Path(job.path))
        try:
            await self._transcribe(job, samples)
        finally:
            held.release()

    async def _transcribe(self, job: Job, samples: Any) -> None:
        total = total_frames(samples)
        started = time.monotonic()

        def request() -> Work:
            """From the checkpoint: where the last stored window ends."""
            options: dict[str, Any] = {
                "seek": job.seek,
                "first_id": len(job.segments),
                "language": job.language,
                "prompt": job.prompt,
                "words": job.words,
            }
            if job.diarize:
                options["speakers"] = job.speakers or {}
            return Work("windows", samples, options)

        async def on_window(_: str, window: Window) -> None:
            pieces = [p.public() for p in window.pieces]
            if not job.words:  # diarization needed them; the job did not ask for them
                for piece in pieces:
                    piece.pop("words", None)
            job.segments.extend(pieces)
            job.seek = window.next_seek
            if window.speakers is not None:
                job.speakers = window.speakers
            job.progress = min(1.0, job.seek / total) if total else 1.0
            await self.store.checkpoint(job)
            for piece in pieces:
                self.events.publish({"type": "segment", "segment": piece}, job.id)
            self.events.publish({"type": "progress", "progress": job.progress}, job.id)

        async def on_state(state: str) -> None:
            job.state = "paused" if state == "paused" else "running"
            if state == "paused":
                job.yields += 1
            await self.store.checkpoint(job)
            self.events.publish({"type": "state", "state": job.state, "progress": job.progress}, job.id)

        await self._placement.run(request, priority="batch", wait_s=None, on_message=on_window, on_state=on_state)
        self._metrics.rtf.observe(job.duration / max(1e-6, time.monotonic() - started))
        job.state, job.progress, job.seek = "done", 1.0, total
        await self.store.save(job)
        self._finished(job)
        self._spawn(self._index(job))

    def _finished(self, job: Job) -> None:
        self._metrics.jobs.labels(job.state).inc()
        if job.owner is not None:
            self._spawn(self.unreserve(job.owner, job.id))
        if job.state in ("failed", "cancelled"):
            _remove(job.path)
        log.info("job ended", extra={"job_id": job.id, "state": job.state, "segments": len(job.segments)})
        self.events.publish({"type": job.state, "state": job.state, "progress": job.progress, "text": job.text}, job.id)

    # -- indexing ----------------------------------------------------------------------

    async def _index(self, job: Job) -> None:
        """Send the transcript to RAG until it takes it; backoff doubles up to the maximum."""
        delay = 0.5
        segments = [
            SegmentIn.model_construct(text=s["text"].strip(), start=s["start"], end=s["end"], speaker=s.get("speaker"))
            for s in job.segments
            if s["text"].strip()
        ]
        # Not validated here: the RAG service does, and says why it refuses for good.
        body = SegmentsIn.model_construct(
            job_id=job.id, source=job.filename, recorded_at=datetime.fromisoformat(job.recorded_at), segments=segments
        ).model_dump(mode="json", exclude_unset=True)
        while segments:
            try:
                # Stored as the job owner's memories: the service acts for them.
                response = await self._rag.request(
                    "POST", "/v1/segments", json=body, idempotent=True, headers={ON_BEHALF_OF: job.owner or HOLDER}
                )
                if response.status_code == 200:
                    break
                log.warning("RAG refused the transcript", extra={"job_id": job.id, "status": response.status_code})
                if _for_good(response):
                    job.index_error = _message(response)
                    await self.store.save(job)
                    self.events.publish({"type": "indexed", "indexed": False, "error": job.index_error}, job.id)
                    return
            except ServiceUnreachable:
                log.info("RAG unreachable; will retry indexing", extra={"job_id": job.id, "in_s": delay})
            self._metrics.index.labels("failed").inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._settings.index_retry_max_s)
        self._metrics.index.labels("ok").inc()
        job.indexed = True
        await self.store.save(job)
        await asyncio.to_thread(_remove, job.path)
        self.events.publish({"type": "indexed", "indexed": True}, job.id)
        log.info("transcript indexed", extra={"job_id": job.id})
