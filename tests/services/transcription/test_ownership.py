"""Jobs, their events and their transcripts belong to whoever submitted them."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Mint
from tests.services.transcription.conftest import SPEECH, Tx
from tests.services.transcription.test_transcription import wait_for_job
from tests.support.servers import ServiceProcess, wait_until

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
