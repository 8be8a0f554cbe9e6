"""A store damaged on purpose: /ready says so, reads and writes answer 503 in the
envelope, and the rebuild command restores from the journal everything answered 2xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.servers import REPO_ROOT, ChromaServer, ServiceProcess
from tests.conftest import Mint

pytestmark = pytest.mark.slow

NOTES = [
    {"id": "door", "text": "The door code of the Harbor office changes every Monday."},
    {"id": "lunch", "text": "Lunch on Fridays is at the noodle bar by the station."},
    {"id": "gone", "text": "This note is deleted before the damage, and must stay deleted."},
]


def rebuild(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.rag.rebuild", *args],
        cwd=REPO_ROOT,
        env={k: v for k, v in env.items() if not k.startswith("JWT_")},  # it needs no secret
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def memories(http: httpx.Client) -> list[tuple[str, str]]:
    found = http.post("/v1/query", json={"query": "office notes", "top_k": 10})
    assert found.status_code == 200, found.text
    return sorted((hit["id"], hit["text"]) for hit in found.json()["results"])


def test_a_damaged_store_is_not_ready_and_is_rebuilt_with_nothing_lost(
    tmp_path: Path, log_dir: Path, mint: Mint
) -> None:
    store = tmp_path / "chroma"
    service = ServiceProcess("rag", {"RAG_CHROMA_PATH": str(store)}, log_dir)
    token = mint("rag:read", "rag:write", sub="alice")
    before: list[tuple[str, str]] = []
    stats: dict[str, Any] = {}

    def client() -> httpx.Client:
        return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    service.start()
    try:
        with client() as http:
            assert http.post("/v1/documents", json={"documents": NOTES}).status_code == 200
            assert http.delete("/v1/documents/gone").status_code == 204
            segments = {
                "job_id": "job-1",
                "source": "standup.ogg",
                "recorded_at": "2026-11-20T09:00:00Z",
                "segments": [{"start": 0.0, "end": 4.0, "text": "The office moves to the third floor."}],
            }
            assert http.post("/v1/segments", json=segments).status_code == 200
            before = memories(http)
            stats = http.get("/v1/stats").json()
            assert http.get("/ready").status_code == 200

            # The running service holds the journal: no rebuild beside it.
            beside = rebuild(service.env)
            assert beside.returncode == 2 and "held by another process" in beside.stderr

            with (store / "chroma.sqlite3").open("r+b") as raw:  # the SQLite header, overwritten
                raw.write(b"this is no longer a database....." * 4)
            assert http.get("/ready").status_code == 503
            write = http.post("/v1/documents", json={"documents": [{"text": "after the damage"}]})
            assert write.status_code == 503, write.text
            assert write.json()["error"]["code"] == "store_unavailable" and "Retry-After" in write.headers
            assert str(store) not in write.text
            for read in (http.get("/v1/stats"), http.post("/v1/query", json={"query": "kept"})):
                assert read.status_code == 503, read.text
    finally:
        service.stop()

    checked = rebuild(service.env, "--check")
    assert checked.returncode == 1 and "differs from its journal" in checked.stderr, checked.stderr
    rebuilt = rebuild(service.env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "holds every record of its journal (3 records)" in rebuilt.stdout
    assert [p.name for p in tmp_path.glob("chroma.damaged-*")], "the damaged store is kept aside"
    assert rebuild(service.env, "--check").returncode == 0

    service.start()
    try:
        with client() as http:
            assert http.get("/ready").status_code == 200
            assert memories(http) == before
            assert "gone" not in {memory_id for memory_id, _ in before}
            assert http.get("/v1/stats").json() == stats
            assert http.post("/v1/documents", json={"documents": [{"text": "after the rebuild"}]}).status_code == 200
    finally:
        service.stop()


def test_a_store_from_before_the_journal_is_copied_into_it(tmp_path: Path, log_dir: Path, mint: Mint) -> None:
    env = {"RAG_CHROMA_PATH": str(tmp_path / "chroma")}
    token = mint("rag:read", "rag:write", sub="alice")
    service = ServiceProcess("rag", env, log_dir).start()
    try:
        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            assert http.post("/v1/documents", json={"documents": NOTES[:2]}).status_code == 200
    finally:
        service.stop()
    for leftover in tmp_path.glob("rag-journal.sqlite3*"):  # as if written before the journal existed
        leftover.unlink()
    service.start()
    service.stop()
    checked = rebuild(service.env, "--check")
    assert checked.returncode == 0, checked.stderr
    assert "(2 records)" in checked.stdout


@pytest.mark.parametrize("backend", ["embedded", "server"])
def test_reingesting_adds_nothing_and_the_data_survives_a_restart(
    backend: str, tmp_path: Path, log_dir: Path, mint: Mint
) -> None:
    """A process restart: the in-process tests (test_rag.py) cannot show this, as Chroma
    keeps an embedded store open per path for the life of the process."""
    chroma = ChromaServer(tmp_path / "chroma-server").start() if backend == "server" else None
    env = {"RAG_CHROMA_URL": chroma.url} if chroma else {"RAG_CHROMA_PATH": str(tmp_path / "chroma")}
    service = ServiceProcess("rag", env | {"RAG_JOURNAL_PATH": str(tmp_path / "journal.sqlite3")}, log_dir)
    token = mint("rag:read", "rag:write", sub="service:test")
    docs = [{"id": "a", "text": "Alpha launches in May."}, {"text": "Beta is paused until the audit ends."}]

    def ingest(http: httpx.Client) -> dict[str, Any]:
        response = http.post("/v1/documents", json={"documents": docs, "collection": "restart"})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def count(http: httpx.Client) -> int:
        return int(http.get("/v1/stats").json()["collections"].get("restart", 0))

    def client() -> httpx.Client:
        return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)

    try:
        service.start()
        with client() as http:
            first = ingest(http)
            assert first["chunks"] == 2
            assert first["ids"][0] == "a" and str(first["ids"][1]).startswith("doc-")
            assert ingest(http) == {"ids": first["ids"], "chunks": 0}
            assert count(http) == 2
        service.stop()
        service.start()
        with client() as http:
            assert count(http) == 2
            found = http.post(
                "/v1/query", json={"query": "When does Alpha launch?", "collection": "restart", "top_k": 1}
            )
            assert found.json()["results"][0]["id"] == "a#0"
            assert ingest(http)["chunks"] == 0
    finally:
        service.stop()
        if chroma:
            chroma.stop()
