"""The transcription service with real faster-whisper, coordinator, Redis and RAG."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import openai
import pytest
from pydantic import TypeAdapter

from harness.servers import RedisServer, ServiceProcess, free_port, wait_until
from services.transcription.schemas import TranscriptDelta, TranscriptDone
from shared.gpu import LeaseRequest
from shared.sse_reader import read_json
from tests.services.transcription.conftest import MEETING, REFERENCES, SPEECH, StartTx, Tx, edits, silence

pytestmark = pytest.mark.slow


def wait_for_job(tx: Tx, job_id: str, state: str = "done", timeout_s: float = 120) -> dict[str, Any]:
    wait_until(lambda: tx.job(job_id)["state"] in (state, "failed", "cancelled"), timeout_s, f"job {state}")
    job = tx.job(job_id)
    assert job["state"] == state, job
    return job


@pytest.fixture(scope="module")
def shipped(start_tx: StartTx) -> Tx:
    """A service that decodes as shipped (beam 5): the one the accuracy tests measure."""
    return start_tx(beam_size=5)


def test_openai_client_transcribes_with_a_low_word_error_rate(
    shipped: Tx, record_property: Callable[[str, object], None]
) -> None:
    client = openai.OpenAI(base_url=f"{shipped.url}/v1", api_key=shipped.token)
    errors = total = 0
    for name, reference in REFERENCES.items():
        with (SPEECH / name).open("rb") as handle:
            result = client.audio.transcriptions.create(model="whisper-1", file=handle)
        wrong, count = edits(reference, result.text)
        errors, total = errors + wrong, total + count
    record_property("measured: word error rate, tiny.en, the sentences", f"{errors / total:.1%}")
    assert errors / total <= 0.15, errors / total


def test_streaming_delivers_segments_before_the_end(tx: Tx) -> None:
    received: list[tuple[float, dict[str, Any]]] = []
    with (
        MEETING.open("rb") as handle,
        tx.http.stream(
            "POST",
            "/v1/audio/transcriptions",
            files={"file": ("meeting.ogg", handle)},
            data={"model": "whisper-1", "stream": "true"},
        ) as response,
    ):
        assert response.status_code == 200
        received.extend((time.monotonic(), body) for body in read_json(response.iter_lines()))
    as_documented = TypeAdapter(TranscriptDelta | TranscriptDone)  # the events' schema in /openapi.json
    for _, event in received:
        as_documented.validate_python(event)
    deltas = [(at, e) for at, e in received if e["type"] == "transcript.text.delta"]
    done_at, done = received[-1]
    assert done["type"] == "transcript.text.done"
    assert len(deltas) >= 5
    assert deltas[0][0] < done_at - 0.5  # the first segment came well before the end
    assert done["text"] == "".join(e["delta"] for _, e in deltas).strip()
    assert "deadline" in done["text"].lower()


def test_a_job_transcribes_the_long_recording_and_reports_progress(
    shipped: Tx, record_property: Callable[[str, object], None]
) -> None:
    tx = shipped
    job_id = tx.submit(MEETING, recorded_at="2026-11-02T10:00:00Z")
    events: list[dict[str, Any]] = []
    with tx.http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        events.extend(read_json(stream.iter_lines()))
    assert events[0]["type"] == "snapshot"
    progress = [e["progress"] for e in events if e["type"] == "progress"]
    assert progress == sorted(progress) and len(progress) >= 3
    assert events[-1]["type"] == "done"
    job = tx.job(job_id)
    assert job["progress"] == 1.0 and job["duration"] > 60
    wrong, count = edits((SPEECH / "meeting.txt").read_text(), job["text"])
    record_property("measured: word error rate, tiny.en, the meeting as a job", f"{wrong / count:.1%}")
    assert wrong / count <= 0.15
    wait_until(lambda: tx.job(job_id)["indexed"], 30, "the transcript to be indexed")


@pytest.fixture(scope="module")
def reference(tx: Tx) -> dict[str, Any]:
    """The meeting's job, unpreempted, by a service configured as ``start_tx()`` makes it."""
    return wait_for_job(tx, tx.submit(MEETING))


def test_a_preempted_job_gives_exactly_the_unpreempted_transcript(tx: Tx, reference: dict[str, Any]) -> None:

    async def preempt_twice(job_id: str) -> list[int]:
        asker = tx.holder("llm")
        fences = []
        async with httpx.AsyncClient(
            base_url=tx.url, headers={"Authorization": f"Bearer {tx.token}"}, timeout=120
        ) as http:
            for round_ in range(2):
                async with asyncio.timeout(60):
                    while True:  # the first time, once something is stored; then as soon as it runs again
                        job = (await http.get(f"/v1/jobs/{job_id}")).json()
                        if job["state"] == "running" and (round_ or job["segments"]):
                            break
                        assert job["state"] != "done", "the job ended before it could be preempted"
                        await asyncio.sleep(0.02)
                lease = await asker.acquire(LeaseRequest("llm", "interactive", wait_s=30))  # the job yields
                fences.append(lease.fence)
                paused = (await http.get(f"/v1/jobs/{job_id}")).json()
                assert paused["state"] == "paused"
                await lease.release()
        await asker.aclose()
        return fences

    job_id = tx.submit(MEETING)
    fences = asyncio.run(preempt_twice(job_id))
    preempted = wait_for_job(tx, job_id)
    assert preempted["yields"] == 2
    assert [(s["start"], s["end"], s["text"]) for s in preempted["segments"]] == [
        (s["start"], s["end"], s["text"]) for s in reference["segments"]
    ]
    grants = [h for h in reversed(tx.history(limit=10)) if h["fence"] >= fences[0] - 1]
    assert [(g["holder"], g["priority"]) for g in grants[:5]] == [
        ("transcription", "batch"),
        ("llm", "interactive"),
        ("transcription", "batch"),
        ("llm", "interactive"),
        ("transcription", "batch"),
    ]
    assert [g["fence"] for g in grants[:5]] == sorted(g["fence"] for g in grants[:5])
    assert all(g["end"] == "released" for g in grants[:4])


def test_killing_the_service_mid_job_resumes_from_the_checkpoint(start_tx: StartTx, reference: dict[str, Any]) -> None:
    tx = start_tx()
    job_id = tx.submit(MEETING)
    wait_until(lambda: len(tx.job(job_id)["segments"]) > 0, 60, "a first checkpoint")
    tx.service.kill()
    tx.service.start()
    done = wait_for_job(tx, job_id)
    assert done["segments"] == reference["segments"]
    resumed = [
        json.loads(line)
        for line in tx.service.log().splitlines()
        if line.startswith("{") and '"resuming job"' in line and job_id in line
    ]
    assert resumed and resumed[-1]["seek"] > 0  # not from the start


def test_rag_down_then_back_indexes_the_transcript(start_tx: StartTx, log_dir: Path, tmp_path: Path, mint: Any) -> None:
    port = free_port()
    tx = start_tx(rag_url=f"http://127.0.0.1:{port}")
    job_id = tx.submit(SPEECH / "sentence-02.ogg")
    job = wait_for_job(tx, job_id)
    assert job["indexed"] is False
    rag = ServiceProcess("rag", {"RAG_CHROMA_PATH": str(tmp_path / "chroma")}, log_dir, port=port).start()
    try:
        wait_until(lambda: tx.job(job_id)["indexed"], 30, "indexing after RAG came back")
        found = httpx.post(
            f"{rag.url}/v1/query",
            json={"query": "finance report", "filter": {"job_id": job_id}},
            headers={"Authorization": f"Bearer {mint('rag:read')}"},
        ).json()["results"]
        assert found and found[0]["metadata"]["source"] == "sentence-02.ogg"
    finally:
        rag.stop()


async def test_cancel_a_job(tx: Tx) -> None:
    holder = tx.holder("llm")
    lease = await holder.acquire(LeaseRequest("llm", "interactive", wait_s=30, ttl_ms=30000))  # the job cannot start
    try:
        async with httpx.AsyncClient(base_url=tx.url, headers={"Authorization": f"Bearer {tx.token}"}) as http:
            with MEETING.open("rb") as handle:
                job_id = (await http.post("/v1/jobs", files={"file": ("meeting.ogg", handle)})).json()["job_id"]
            cancelled = await http.delete(f"/v1/jobs/{job_id}")
            assert cancelled.status_code == 200
            assert cancelled.json()["state"] in ("cancelled", "cancelling")
            async with asyncio.timeout(10):
                while (await http.get(f"/v1/jobs/{job_id}")).json()["state"] != "cancelled":
                    await asyncio.sleep(0.02)
                while tx.gpu_http.get("/v1/gpu").json()["queue"]:  # it left the GPU queue too
                    await asyncio.sleep(0.02)
            assert (await http.delete("/v1/jobs/job-nope")).status_code == 404
    finally:
        await lease.release()
        await holder.aclose()


def test_the_job_store_down_is_503_with_retry_after(start_tx: StartTx, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        alone = start_tx(env_extra={"TRANSCRIPTION_REDIS_URL": redis.url})
        assert alone.http.get("/v1/jobs").status_code == 200
        redis.kill()
        for path in ("/v1/jobs", "/v1/jobs/job-0123456789abcdef"):
            down = alone.http.get(path)
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "store_unavailable" and int(down.headers["Retry-After"]) >= 1
            assert str(redis.port) not in down.text
    finally:
        redis.stop()


def long_silence_flac(path: Path, hours: float) -> Path:
    """Hours of silence in a few MB of FLAC (8 kHz): small to send, huge once decoded."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=8000)
        stream.layout = "mono"
        ten_seconds = np.zeros((1, 80_000), dtype=np.int16)
        for _ in range(int(hours * 360)):
            frame = av.AudioFrame.from_ndarray(ten_seconds, format="s16", layout="mono")
            frame.sample_rate = 8000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def peak_rss_mb(service: ServiceProcess) -> float:
    assert service.process is not None
    status = Path(f"/proc/{service.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def test_audio_over_the_limit_is_refused_before_it_is_decoded(start_tx: StartTx, tmp_path: Path) -> None:
    """5 h of FLAC (3.4 MB; 1.15 GB once decoded to float32) against a 4 h limit: 413 from
    the container's stated duration, three at once, and the service's peak memory grows
    by less than 100 MB (stated bound)."""
    big = long_silence_flac(tmp_path / "five-hours.flac", 5)
    limited = start_tx(max_upload_mb=8, max_duration_s=14400)
    before = peak_rss_mb(limited.service)

    def send(_: int) -> httpx.Response:
        with big.open("rb") as handle:
            return limited.http.post("/v1/jobs", files={"file": ("five-hours.flac", handle)})

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(send, range(3)))
    for answer in answers:
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "audio_too_long"
        assert answer.elapsed.total_seconds() < 2
    assert peak_rss_mb(limited.service) - before < 100
    assert limited.transcribe(SPEECH / "sentence-01.ogg").status_code == 200  # and it still serves


def test_three_long_files_at_once_share_the_memory_budget(
    start_tx: StartTx, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """Three 20-minute FLACs (73 MB each once decoded) sent at once against a budget
    that holds one (80 MB): they are decoded and run one after another, all are
    accepted, and the service's peak memory grows by less than the budget plus 100 MB
    (140 MB measured; 250 MB with a budget that holds all three). Before the budget,
    three 5 h files at once took the process from 636 MB to 8.6 GB."""
    clip = long_silence_flac(tmp_path / "twenty-minutes.flac", 1 / 3)
    budget_mb = 80
    limited = start_tx(max_upload_mb=8, max_duration_s=1300, decode_budget_mb=budget_mb, decode_wait_s=300)
    before = peak_rss_mb(limited.service)

    def send(_: int) -> httpx.Response:
        with clip.open("rb") as handle:
            return limited.http.post("/v1/jobs", files={"file": ("twenty-minutes.flac", handle)}, timeout=600)

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(send, range(3)))
    assert [answer.status_code for answer in answers] == [202] * 3, [a.text for a in answers]
    for answer in answers:
        assert wait_for_job(limited, answer.json()["job_id"], timeout_s=600)["text"] == ""
    growth = peak_rss_mb(limited.service) - before
    record_property("measured: peak memory growth, three 20-min files at once, 80 MB budget", f"{growth:.0f} MB")
    assert growth < budget_mb + 100


def test_silence_gives_a_job_no_text_and_nothing_to_index(tx: Tx, tmp_path: Path) -> None:
    """Without voice-activity detection, minutes of silence became "You You You…" and
    were indexed as memories."""
    job_id = tx.submit(silence(tmp_path / "quiet.ogg", 95))
    done = wait_for_job(tx, job_id)
    assert done["segments"] == [] and done["text"] == ""
    assert done["progress"] == 1.0
