"""Every user sees only their own memories (and shared ones); an admin sees all."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from harness.servers import RedisServer
from services.rag.app import create_app
from services.rag.settings import RAGSettings
from shared.auth import ON_BEHALF_OF
from shared.settings import AuthSettings, LimitSettings
from tests.conftest import Mint
from tests.services.rag.conftest import As, Rag, bearer

DOOR = "The door code of the Harbor office is 4711."


class User:
    def __init__(self, rag: Rag, token: str, collection: str, **headers: str) -> None:
        self.http = rag.client(token, **headers)
        self.collection = collection

    def ingest(self, *documents: dict[str, Any]) -> Any:
        return self.http.post("/v1/documents", json={"documents": list(documents), "collection": self.collection})

    def query(self, text: str, **options: object) -> list[dict[str, Any]]:
        response = self.http.post("/v1/query", json={"query": text, "collection": self.collection, **options})
        assert response.status_code == 200, response.text
        return list(response.json()["results"])

    def delete(self, memory_id: str) -> int:
        return self.http.delete(f"/v1/documents/{memory_id}", params={"collection": self.collection}).status_code

    def count(self) -> int:
        return int(self.http.get("/v1/stats").json()["collections"].get(self.collection, 0))


@pytest.fixture
def people(rag: Rag, mint: Mint, collection: str) -> dict[str, User]:
    scopes = ("rag:read", "rag:write")
    return {
        "alice": User(rag, mint(*scopes, sub="alice"), collection),
        "bob": User(rag, mint(*scopes, sub="bob"), collection),
        "carol": User(rag, mint(*scopes, "rag:share", sub="carol"), collection),
        "admin": User(rag, mint("admin", "rag:read", "rag:write", sub="ops"), collection),
    }


def test_another_users_document_is_never_seen_overwritten_or_deleted(people: dict[str, User]) -> None:
    alice, bob, admin = people["alice"], people["bob"], people["admin"]
    assert alice.ingest({"id": "harbor", "text": DOOR}).status_code == 200
    assert [r["id"] for r in alice.query("door code Harbor office")] == ["harbor#0"]
    assert bob.query("door code Harbor office") == []
    assert bob.count() == 0 and alice.count() == 1

    # The same id from Bob is Bob's own document; Alice's is untouched.
    assert bob.ingest({"id": "harbor", "text": "Bob's notes on the harbor: bring a coat."}).status_code == 200
    assert "4711" in alice.query("door code Harbor office")[0]["text"]
    assert "4711" not in " ".join(r["text"] for r in bob.query("door code Harbor office"))

    # Bob deletes his own; another attempt finds nothing of his: 404, never Alice's.
    assert bob.delete("harbor") == 204
    assert bob.delete("harbor") == 404
    assert "4711" in alice.query("door code Harbor office")[0]["text"]

    # An admin sees everyone's, with the owner.
    seen = admin.query("door code Harbor office")
    assert seen[0]["metadata"]["owner"] == "alice"
    assert "owner" not in alice.query("door code Harbor office")[0]["metadata"]
    assert admin.count() == 1

    # The audit log has Bob's delete and the admin's read of Alice's memories.
    assert alice.http.get("/v1/audit").status_code == 403
    deleted = admin.http.get("/v1/audit", params={"kind": "deleted"}).json()["events"]
    assert any(e["subject"] == "bob" and e["path"] == "/v1/documents/harbor" for e in deleted)
    read = admin.http.get("/v1/audit", params={"kind": "admin_read"}).json()["events"]
    assert read[0]["subject"] == "ops" and read[0]["owners"] == ["alice"] and read[0]["path"] == "/v1/query"


def test_shared_documents_need_their_scope_and_are_seen_by_all(people: dict[str, User]) -> None:
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    refused = alice.ingest({"id": "menu", "text": "The canteen serves soup on Fridays.", "shared": True})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"
    assert (
        carol.ingest({"id": "menu", "text": "The canteen serves soup on Fridays.", "shared": True}).status_code == 200
    )
    for reader in (alice, bob):
        found = reader.query("what does the canteen serve")
        assert found and found[0]["metadata"]["shared"] is True
        assert reader.delete("menu") == 404  # seen, but not theirs to delete
    assert carol.delete("menu") == 204


def test_a_service_acts_for_a_user_but_a_user_cannot_pose_as_another(
    rag: Rag, people: dict[str, User], mint: Mint, collection: str
) -> None:
    people["alice"].ingest({"id": "harbor", "text": DOOR})
    service = User(rag, mint("rag:read", "rag:write", sub="service:llm"), collection, **{ON_BEHALF_OF: "alice"})
    assert [r["id"] for r in service.query("door code Harbor office")] == ["harbor#0"]
    posing = User(rag, mint("rag:read", "rag:write", sub="bob"), collection, **{ON_BEHALF_OF: "alice"})
    assert posing.query("door code Harbor office") == []  # the header counts only from services
    # Segments a service stores for a user are that user's.
    stored = service.http.post(
        "/v1/segments",
        json={
            "job_id": "job-1",
            "source": "alice-confidential-hr-call.ogg",
            "recorded_at": "2026-11-02T10:00:00Z",
            "segments": [{"text": "The salary review moves to March.", "start": 0, "end": 3}],
            "collection": collection,
        },
    )
    assert stored.status_code == 200
    assert people["alice"].query("salary review", filter={"job_id": "job-1"})
    assert people["bob"].query("salary review", filter={"job_id": "job-1"}) == []
    assert people["bob"].delete("job-1") == 404


@pytest.fixture(scope="module")
def small_quota(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, auth_settings: AuthSettings
) -> Iterator[Any]:
    """A RAG app whose users may store 2,000 bytes of text each."""
    folder = tmp_path_factory.mktemp("rag-quota")
    limits = LimitSettings(
        redis_url=redis_server.url, key_prefix=f"quota-{secrets.token_hex(4)}:", limit_stored_mb=2000 / 1_048_576
    )
    app = create_app(RAGSettings(auth=auth_settings, chroma_path=folder / "chroma", limits=limits))
    with TestClient(app, base_url="http://rag") as client:
        yield client


def test_stored_text_is_counted_per_user_against_their_quota(small_quota: Any, mint: Mint) -> None:
    def user(sub: str) -> contextlib.nullcontext[As]:
        return contextlib.nullcontext(As(small_quota, bearer(mint("rag:read", "rag:write", sub=sub))))

    def ingest(http: As, doc_id: str, size: int) -> Any:
        return http.post("/v1/documents", json={"documents": [{"id": doc_id, "text": "word " * (size // 5)}]})

    with user("alice") as alice, user("bob") as bob:
        assert ingest(alice, "a", 1500).status_code == 200
        over = ingest(alice, "b", 1000)
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "storage_quota_exceeded"
        assert "retry-after" not in over.headers  # waiting does not help: deleting does
        assert ingest(bob, "a", 1500).status_code == 200  # a quota per user
        assert ingest(alice, "a", 500).status_code == 200  # replaced: 1,500 bytes become 500
        assert ingest(alice, "b", 1000).status_code == 200
        assert ingest(alice, "c", 1000).status_code == 429
        assert alice.delete("/v1/documents/a").status_code == 204
        assert alice.delete("/v1/documents/b").status_code == 204
        assert ingest(alice, "c", 1900).status_code == 200  # deletes gave the room back
