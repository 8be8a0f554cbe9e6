"""Real processes for the transcription tests: Redis, coordinator, RAG, transcription."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from baton.demo.speech.make_speech import write_ogg
from harness.servers import RedisServer, ServiceProcess
from shared.gpu import GpuClient
from tests.conftest import Mint

SPEECH = Path(__file__).resolve().parents[3] / "baton" / "demo" / "speech"
MEETING = SPEECH / "meeting.ogg"
REFERENCES: dict[str, str] = json.loads((SPEECH / "references.json").read_text())
TEST_BEAM = 1
"""The beam the service processes here decode with unless a test says otherwise: greedy
search takes about a third less CPU than the shipped beam of 5 (tiny.en, the meeting, 2
cores: 2.2 s against 3.4 s), and what these tests assert (hand-overs, checkpoints,
ownership) is the same either way, since each compares transcripts decoded alike. The
accuracy tests decode as shipped, and so does the in-process app (test_routes.py), whose
speaker tests check words of short clips that greedy search gets wrong ("finance team"
heard as "fine and steam")."""


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words): the numerator and denominator of the word error rate."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[len(hyp)], len(ref)


def silence(path: Path, seconds: float) -> Path:
    write_ogg(np.zeros(int(seconds * 16000), dtype=np.int16), path)
    return path


class Tx:
    def __init__(
        self, service: ServiceProcess, token: str, admin: str, coordinator: ServiceProcess, mint: Mint
    ) -> None:
        self.service = service
        self.mint = mint
        self.http = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=300)
        self.gpu_http = httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        self.token = token
        self.admin = admin
        self.coordinator = coordinator

    @property
    def url(self) -> str:
        return self.service.url

    def info(self) -> dict[str, Any]:
        """/v1/info as an admin sees it (a user sees the model and the limits only)."""
        return dict(self.http.get("/v1/info", headers={"Authorization": f"Bearer {self.admin}"}).json())

    def transcribe(self, path: Path, **form: Any) -> httpx.Response:
        with path.open("rb") as handle:
            return self.http.post(
                "/v1/audio/transcriptions", files={"file": (path.name, handle)}, data={"model": "whisper-1", **form}
            )

    def submit(self, path: Path, **form: Any) -> str:
        with path.open("rb") as handle:
            response = self.http.post("/v1/jobs", files={"file": (path.name, handle)}, data=form)
        assert response.status_code == 202, response.text
        return str(response.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/jobs/{job_id}").json())

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.gpu_http.get("/v1/history", params={"limit": limit}).json())

    def holder(self, name: str) -> GpuClient:
        """A lease client of service ``name`` (only services hold the GPU)."""
        token = self.mint("gpu", sub=f"service:{name}")
        return GpuClient(self.coordinator.url, lambda: token)


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServiceProcess]]:
    prefix = f"tx-{secrets.token_hex(4)}:"
    coordinator = ServiceProcess(
        "coordinator", {"COORDINATOR_REDIS_URL": redis_server.url, "COORDINATOR_KEY_PREFIX": prefix}, log_dir
    ).start()
    rag = ServiceProcess("rag", {"RAG_CHROMA_PATH": str(tmp_path_factory.mktemp("tx-rag") / "chroma")}, log_dir).start()
    yield {"coordinator": coordinator, "rag": rag}
    rag.stop()
    coordinator.stop()


StartTx = Callable[..., Tx]


@pytest.fixture(scope="module")
def start_tx(
    stack: dict[str, ServiceProcess],
    redis_server: RedisServer,
    log_dir: Path,
    mint: Mint,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StartTx]:
    started: list[ServiceProcess] = []

    def start(
        rag_url: str | None = None,
        port: int | None = None,
        key_prefix: str | None = None,
        coordinator_url: str | None = None,
        env_extra: dict[str, str] | None = None,
        **settings: object,
    ) -> Tx:
        env = {
            "TRANSCRIPTION_REDIS_URL": redis_server.url,
            "TRANSCRIPTION_KEY_PREFIX": key_prefix or f"tx-{secrets.token_hex(4)}:",
            "GPU_COORDINATOR_URL": coordinator_url or stack["coordinator"].url,
            "RAG_SERVICE_URL": rag_url or stack["rag"].url,
            "TRANSCRIPTION_DATA_DIR": str(tmp_path_factory.mktemp("tx-data")),
            "TRANSCRIPTION_LEASE_TTL_MS": "2000",
            "TRANSCRIPTION_MAX_UPLOAD_MB": "1",
            "TRANSCRIPTION_MAX_DURATION_S": "100",
            "TRANSCRIPTION_INDEX_RETRY_MAX_S": "1",
            "TRANSCRIPTION_BEAM_SIZE": str(TEST_BEAM),
        }
        env.update({f"TRANSCRIPTION_{k.upper()}": str(v) for k, v in settings.items()})
        env.update(env_extra or {})
        service = ServiceProcess("transcription", env, log_dir, port=port).start()
        started.append(service)
        return Tx(
            service, mint("transcribe", sub="tester"), mint("admin", "gpu", sub="ops"), stack["coordinator"], mint
        )

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def tx(start_tx: StartTx) -> Tx:
    return start_tx()
