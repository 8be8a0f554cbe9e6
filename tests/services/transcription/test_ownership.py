"""Jobs, their events and their transcripts belong to whoever submitted them."""

from __future__ import annotations

import secrets

import httpx
import pytest

from harness.servers import RedisServer, ServiceProcess, wait_until
from tests.conftest import Mint
from tests.services.transcription.conftest import MEETING, SPEECH, StartTx, Tx
from tests.services.transcription.test_transcription import wait_for_job

pytestmark = pytest.mark.slow


def client(tx: Tx, token: str) -> httpx.Client:
    return httpx.Client(base_url=tx.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def test_another_users_job_is_not_found_anywhere(tx: Tx, mint: Mint, stack: dict[str, ServiceProcess]) -> None:
    alice = client(tx, mint("transcribe", sub="alice"))
    bob = client(tx, mint("transcribe", sub="bob"))
    admin = client(tx, mint("admin", "transcribe", sub="ops"))
    with (SPEECH / "sentence-02.ogg").open("rb") as handle:
        job_id = alice.post("/v1/jobs", files={"file": ("alice-confidential-hr-call.ogg", handle)}).json()["job_id"]

    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ):
        refused = bob.request(method, path)
        assert refused.status_code == 404, (method, path, refused.text)
        assert refused.json()["error"]["type"] == "not_found_error"
    assert job_id not in bob.get("/v1/jobs").text
    assert "alice-confidential" not in bob.get("/v1/jobs").text

    tx_alice = Tx(tx.service, mint("transcribe", sub="alice"), tx.admin, tx.coordinator, mint)
    done = wait_for_job(tx_alice, job_id)
    assert done["state"] == "done" and done["owner"] == "alice"  # Bob's cancel did nothing
    assert job_id in [j["job_id"] for j in alice.get("/v1/jobs").json()["jobs"]]
    assert job_id in [j["job_id"] for j in admin.get("/v1/jobs", params={"limit": 200}).json()["jobs"]]
    assert admin.get(f"/v1/jobs/{job_id}").status_code == 200

    # The transcript became Alice's memory, not Bob's.
    wait_until(lambda: alice.get(f"/v1/jobs/{job_id}").json()["indexed"], 30, "the transcript to be indexed")
    rag = stack["rag"].url
    ask = {"query": "finance report", "filter": {"job_id": job_id}}
    as_alice = httpx.post(
        f"{rag}/v1/query", json=ask, headers={"Authorization": f"Bearer {mint('rag:read', sub='alice')}"}
    )
    as_bob = httpx.post(f"{rag}/v1/query", json=ask, headers={"Authorization": f"Bearer {mint('rag:read', sub='bob')}"})
    assert as_alice.json()["results"] and as_bob.json()["results"] == []


def test_queued_jobs_are_limited_per_user(start_tx: StartTx, mint: Mint, redis_server: RedisServer) -> None:
    limited = start_tx(
        env_extra={
            "BATON_REDIS_URL": redis_server.url,
            "BATON_KEY_PREFIX": f"jobs-{secrets.token_hex(4)}:",
            "BATON_LIMIT_JOBS": "1",
        }
    )
    alice = client(limited, mint("transcribe", sub="alice"))
    bob = client(limited, mint("transcribe", sub="bob"))

    def submit(http: httpx.Client) -> httpx.Response:
        with MEETING.open("rb") as handle:
            return http.post("/v1/jobs", files={"file": ("meeting.ogg", handle)})

    first = submit(alice)
    assert first.status_code == 202
    refused = submit(alice)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_jobs" and int(refused.headers["Retry-After"]) >= 1
    assert submit(bob).status_code == 202  # a limit per user
    assert alice.delete(f"/v1/jobs/{first.json()['job_id']}").status_code == 200
    # Once her job has ended, its place is free again.
    job_url = f"/v1/jobs/{first.json()['job_id']}"
    wait_until(lambda: alice.get(job_url).json()["state"] == "cancelled", 30, "the job is cancelled")
    wait_until(lambda: submit(alice).status_code == 202, 30, "a new job is accepted")
