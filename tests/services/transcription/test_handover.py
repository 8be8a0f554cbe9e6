"""The hand-over with real processes: workers paused at once, fenced, replaced, freed.

A chat is played by a GpuClient of the test taking an interactive lease, as the LLM
service would; the coordinator's history tells what each holder did.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.servers import RedisServer, ServiceProcess, wait_until
from harness.speech import long_meeting
from services.transcription.worker import process_state
from shared.gpu import LeaseRequest
from tests.conftest import Mint
from tests.services.transcription.conftest import MEETING, StartTx, Tx
from tests.services.transcription.test_transcription import wait_for_job

pytestmark = pytest.mark.slow

BIG = {"max_upload_mb": 20, "max_duration_s": 1000}


def worker_pids(service: ServiceProcess) -> list[int]:
    """The service's worker processes (multiprocessing's spawned children)."""
    assert service.process is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == service.process.pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of all of the process's threads, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def decoding_worker(service: ServiceProcess) -> int:
    """The worker that is using the CPU now (polls until one's CPU time grows)."""
    before = {pid: cpu_ticks(pid) for pid in worker_pids(service)}
    found: list[int] = []

    def grew() -> bool:
        growth = {pid: cpu_ticks(pid) - ticks for pid, ticks in before.items()}
        # The one that grew most: another may use a little CPU meanwhile (loading, exiting).
        found[:] = [max(growth, key=lambda pid: growth[pid])] if max(growth.values(), default=0) > 5 else []
        return bool(found)

    wait_until(grew, 30, "a worker to decode")
    return found[0]


def texts(job: dict[str, Any]) -> list[tuple[float, float, str]]:
    return [(s["start"], s["end"], s["text"]) for s in job["segments"]]


def metric(tx: Tx, name: str) -> float:
    for line in tx.gpu_http.get(f"{tx.url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The meeting three times over (3.6 minutes)."""
    return long_meeting(tmp_path_factory.mktemp("audio"), 3)[0]


@pytest.fixture(scope="module")
def reference(tx: Tx) -> dict[str, Any]:
    """The meeting's job transcript, unpreempted (by the module's service as configured
    by default: each test that kills or stops a service has one of its own)."""
    return wait_for_job(tx, tx.submit(MEETING))


@pytest.fixture(scope="module")
def big(start_tx: StartTx) -> Tx:
    """A service that takes the long recording, for the tests that leave it as they found it."""
    return start_tx(**BIG)


async def take_gpu(tx: Tx, vram_mb: int = 0) -> Any:
    """An interactive lease, as a chat would take it."""
    asker = tx.holder("llm")
    lease = await asker.acquire(LeaseRequest("llm", "interactive", wait_s=60, vram_mb=vram_mb))
    return asker, lease


def test_killing_the_service_while_its_worker_is_paused_leaves_no_process(
    start_tx: StartTx, reference: dict[str, Any]
) -> None:
    tx = start_tx()
    workers = worker_pids(tx.service)
    assert len(workers) == 2
    job_id = tx.submit(MEETING)
    wait_until(lambda: len(tx.job(job_id)["segments"]) > 0, 60, "a first checkpoint")

    async def pause_then_kill() -> None:
        asker, lease = await take_gpu(tx)
        try:
            wait_until(lambda: tx.job(job_id)["state"] == "paused", 10, "the job to say it is paused")
            # SIGSTOP takes effect when the kernel next runs the worker: on a busy machine,
            # a moment after the service sent it.
            stopped = lambda: "T" in [process_state(pid) for pid in workers]  # noqa: E731
            wait_until(stopped, 10, "a worker to be stopped, not ended")
            tx.service.kill()
        finally:
            await lease.release()  # whatever happened: the next test needs the card
            await asker.aclose()

    asyncio.run(pause_then_kill())
    wait_until(lambda: all(process_state(pid) in (None, "Z") for pid in workers), 10, "the workers to end")
    tx.service.start()
    assert texts(wait_for_job(tx, job_id)) == texts(reference)


def test_a_worker_that_dies_mid_window_is_replaced(start_tx: StartTx, reference: dict[str, Any]) -> None:
    tx = start_tx()
    job_id = tx.submit(MEETING)
    wait_until(lambda: len(tx.job(job_id)["segments"]) > 0, 60, "a first checkpoint")
    os.kill(decoding_worker(tx.service), signal.SIGKILL)
    done = wait_for_job(tx, job_id)
    assert texts(done) == texts(reference)
    assert metric(tx, "transcription_worker_deaths_total") >= 1
    assert len(worker_pids(tx.service)) == 2


def test_a_paused_upload_gives_the_unpreempted_transcript(big: Tx, long_recording: Path) -> None:
    tx = big
    unpreempted = tx.transcribe(long_recording, response_format="verbose_json")
    assert unpreempted.status_code == 200

    result: dict[str, httpx.Response] = {}
    upload = threading.Thread(
        target=lambda: result.setdefault("r", tx.transcribe(long_recording, response_format="verbose_json"))
    )
    upload.start()
    wait_until(lambda: tx.gpu_http.get("/v1/gpu").json()["holder"] == "transcription", 30, "the upload's lease")

    async def chat() -> None:
        asker, lease = await take_gpu(tx)
        await lease.release()
        await asker.aclose()

    asyncio.run(chat())
    upload.join(120)
    assert result["r"].status_code == 200
    assert result["r"].json()["segments"] == unpreempted.json()["segments"]
    paused = [h for h in tx.history(10) if h["holder"] == "transcription" and h.get("handover") == "pause"]
    assert paused and paused[0]["priority"] == "interactive"


@pytest.fixture(scope="module")
def long_text(big: Tx, long_recording: Path) -> str:
    """The long recording's transcript, uploaded alone."""
    response = big.transcribe(long_recording)
    assert response.status_code == 200
    text: str = response.json()["text"]
    return text


def test_the_interactive_path_stops_at_its_fence_when_the_lease_is_lost(
    start_tx: StartTx, long_recording: Path, long_text: str
) -> None:
    tx = start_tx(**BIG)
    result: dict[str, httpx.Response] = {}
    upload = threading.Thread(target=lambda: result.setdefault("r", tx.transcribe(long_recording)))
    upload.start()
    wait_until(lambda: tx.gpu_http.get("/v1/gpu").json()["holder"] == "transcription", 30, "the upload's lease")
    fence = tx.gpu_http.get("/v1/gpu").json()["fence"]
    worker = decoding_worker(tx.service)
    tx.service.signal(signal.SIGSTOP)  # the service stalls: it can neither renew nor pause anything
    try:
        ended = lambda: [h for h in tx.history(5) if h["fence"] == fence and h["end"]]  # noqa: E731
        wait_until(ended, 30, "the coordinator to expire the lease")
        # By the time the lease ran out, the worker had stopped itself at its local deadline.
        assert process_state(worker) == "T"
        assert ended()[0]["end"] == "expired"
    finally:
        tx.service.signal(signal.SIGCONT)
    upload.join(120)
    assert result["r"].status_code == 200
    assert result["r"].json()["text"] == long_text
    lost = [h for h in tx.history(10) if h["fence"] > fence and h["holder"] == "transcription"]
    assert lost, "the upload took the card again to finish"


def test_a_worker_stopped_by_its_own_fence_resumes_at_the_next_renewal(
    big: Tx, long_recording: Path, long_text: str
) -> None:
    """A renewal answered after the lease's local deadline: the worker has stopped itself,
    yet the service still holds the lease. The renewal resumes it; nothing else would."""
    tx = big
    result: dict[str, httpx.Response] = {}
    upload = threading.Thread(target=lambda: result.setdefault("r", tx.transcribe(long_recording)))
    upload.start()
    wait_until(lambda: tx.gpu_http.get("/v1/gpu").json()["holder"] == "transcription", 30, "the upload's lease")
    fence = tx.gpu_http.get("/v1/gpu").json()["fence"]
    os.kill(decoding_worker(tx.service), signal.SIGSTOP)  # what its fence does at the deadline
    upload.join(120)
    assert not upload.is_alive(), "the upload never finished: its worker stayed stopped"
    assert result["r"].status_code == 200
    assert result["r"].json()["text"] == long_text
    leases = [h for h in tx.history(10) if h["fence"] >= fence and h["holder"] == "transcription"]
    assert [(h["fence"], h["end"]) for h in leases] == [(fence, "released")], "one lease, never lost"


def test_two_uploads_at_once_take_turns_not_milliseconds(
    tx: Tx, record_property: Callable[[str, object], None]
) -> None:
    """Two uploads of one service hold the card in turns (COORDINATOR_TURN_MS), not
    one pause per few milliseconds each, and each gets its own transcript."""
    started = time.monotonic()
    alone = tx.transcribe(MEETING).json()["text"]
    one = time.monotonic() - started
    first = max((h["fence"] for h in tx.history(10)), default=0)
    results: list[httpx.Response] = []
    started = time.monotonic()
    uploads = [threading.Thread(target=lambda: results.append(tx.transcribe(MEETING))) for _ in range(2)]
    for upload in uploads:
        upload.start()
    for upload in uploads:
        upload.join(120)
    seconds = time.monotonic() - started
    assert [r.status_code for r in results] == [200, 200]
    assert [r.json()["text"] for r in results] == [alone, alone]
    grants = [h for h in tx.history(1000) if h["fence"] > first and h["holder"] == "transcription"]
    # One grant per turn (the stack's default, 250 ms) at most, and one more each to
    # finish: without turns they swapped the card every ~30 ms.
    assert len(grants) <= seconds / 0.25 + 2, (len(grants), seconds)
    figure = f"{len(grants)} grants, {seconds:.1f} s (one alone: {one:.1f} s)"
    record_property("measured: two uploads of the meeting at once", figure)


@pytest.fixture(scope="module")
def small_card(
    redis_server: RedisServer, log_dir: Path, mint: Mint, stack: dict[str, ServiceProcess], start_tx: StartTx
) -> Iterator[Tx]:
    """A coordinator told the card has 100 MB: less than Whisper and any other holder need."""
    coordinator = ServiceProcess(
        "coordinator",
        {
            "COORDINATOR_REDIS_URL": redis_server.url,
            "COORDINATOR_KEY_PREFIX": "small-card:",
            "COORDINATOR_GPU_MEMORY_MB": "100",
        },
        log_dir,
    ).start()
    tx = start_tx(coordinator_url=coordinator.url, **BIG)
    tx.coordinator = coordinator
    tx.gpu_http = httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {tx.admin}"})
    yield tx
    coordinator.stop()


def test_a_card_too_small_for_both_frees_memory_and_keeps_the_transcript(
    small_card: Tx, reference: dict[str, Any]
) -> None:
    tx = small_card
    job_id = tx.submit(MEETING)
    wait_until(lambda: len(tx.job(job_id)["segments"]) > 0, 60, "a first checkpoint")

    async def chat() -> None:
        asker, lease = await take_gpu(tx, vram_mb=500)
        assert lease.free_memory  # 500 MB + Whisper's > 100 MB
        await lease.release()
        await asker.aclose()

    asyncio.run(chat())
    done = wait_for_job(tx, job_id)
    assert texts(done) == texts(reference)
    restarts = [h for h in tx.history(20) if h["holder"] == "transcription" and h.get("handover") == "restart"]
    assert restarts and restarts[0]["free_memory"] is True


def test_no_weights_stay_on_the_device_after_a_request_when_memory_must_be_freed(small_card: Tx, tx: Tx) -> None:
    for service, expected_handover, on_device in ((small_card, "unload", 0), (tx, "keep", 2)):
        response = service.transcribe(MEETING)
        assert response.status_code == 200 and "deadline" in response.json()["text"].lower()
        last = next(h for h in service.history(10) if h["holder"] == "transcription")
        assert last["handover"] == expected_handover
        assert metric(service, "transcription_workers_on_device") == on_device
