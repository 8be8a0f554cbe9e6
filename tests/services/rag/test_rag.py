"""The RAG service through its in-process app, on embedded Chroma and on a Chroma server."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from harness.routes import misanswered, walk_sync
from tests.conftest import Mint
from tests.services.rag.conftest import Rag

LABELLED = json.loads((Path(__file__).parent / "data" / "labelled.json").read_text())


def ingest(rag: Rag, collection: str, *documents: dict[str, Any]) -> dict[str, Any]:
    response = rag.http.post("/v1/documents", json={"documents": list(documents), "collection": collection})
    assert response.status_code == 200, response.text
    return response.json()


def query(rag: Rag, collection: str, text: str, **options: object) -> list[dict[str, Any]]:
    response = rag.http.post("/v1/query", json={"query": text, "collection": collection, **options})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def count(rag: Rag, collection: str) -> int:
    return int(rag.http.get("/v1/stats").json()["collections"].get(collection, 0))


def test_recall_at_5_on_the_labelled_set(
    rag: Rag, collection: str, record_property: Callable[[str, object], None]
) -> None:
    passages = LABELLED["passages"]
    ingest(rag, collection, *({"id": pid, "text": text} for pid, text in passages.items()))
    questions = LABELLED["questions"]
    assert len(questions) >= 30
    hits = 0
    misses = []
    for question, expected in questions:
        found = [r["metadata"]["doc_id"] for r in query(rag, collection, question, top_k=5, recency_bias=0)]
        if expected in found:
            hits += 1
        else:
            misses.append((question, expected, found))
    recall = hits / len(questions)
    record_property(f"measured: recall@5, {rag.backend} Chroma", f"{hits}/{len(questions)} = {recall:.2f}")
    assert recall >= 0.9, misses


def test_same_id_with_new_text_replaces_the_document(rag: Rag, collection: str) -> None:
    ingest(rag, collection, {"id": "plan", "text": "The plan is to ship in June."})
    replaced = ingest(rag, collection, {"id": "plan", "text": "The plan is to ship in September. " * 60})
    assert replaced["chunks"] > 1
    assert count(rag, collection) == replaced["chunks"]
    top = query(rag, collection, "When do we ship?", top_k=1)[0]
    assert "September" in str(top["text"])


def test_long_documents_are_chunked_on_sentences_with_overlap(rag: Rag, collection: str) -> None:
    sentences = [
        f"Fact number {i} is that the {word} sits on shelf {i}."
        for i, word in enumerate(["kettle", "violin", "compass", "lantern", "anchor", "telescope"] * 8)
    ]
    sentences[29] = "The secret launch code for Project Nightjar is orange-seven."
    stored = ingest(rag, collection, {"id": "long", "text": " ".join(sentences)})
    assert stored["chunks"] >= 3
    chunks = rag.http.post("/v1/query", json={"query": "Fact number", "collection": collection, "top_k": 50}).json()[
        "results"
    ]
    assert all(len(c["text"]) <= 800 for c in chunks)
    assert all(str(c["text"]).endswith(".") for c in chunks)  # ends on a sentence
    by_index = sorted(chunks, key=lambda c: c["metadata"]["chunk"])
    first_of_next = str(by_index[1]["text"]).split(". ")[0]
    assert first_of_next in str(by_index[0]["text"])  # overlap
    top = query(rag, collection, "What is the launch code of Nightjar?", top_k=1)[0]
    assert "orange-seven" in str(top["text"])


def test_segments_are_memories_with_their_metadata_and_filters(rag: Rag, collection: str) -> None:
    recorded = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
    body = {
        "job_id": "job-1",
        "source": "standup.wav",
        "recorded_at": recorded.isoformat(),
        "collection": collection,
        "segments": [
            {"text": "The deadline for the audit is next Friday.", "start": 0.0, "end": 3.5, "speaker": "maria"},
            {"text": "I will book the meeting room for Thursday.", "start": 3.5, "end": 6.0, "speaker": "tom"},
        ],
    }
    stored = rag.http.post("/v1/segments", json=body).json()
    assert stored == {"ids": ["job-1@0.000", "job-1@3.500"], "chunks": 2}
    assert rag.http.post("/v1/segments", json=body).json()["chunks"] == 0  # a retried indexing adds nothing
    other = {
        **body,
        "job_id": "job-2",
        "source": "retro.wav",
        "recorded_at": (recorded + timedelta(days=3)).isoformat(),
    }
    rag.http.post("/v1/segments", json=other)

    top = query(
        rag, collection, "What was said about the deadline?", top_k=1, recency_bias=0, filter={"job_id": "job-1"}
    )[0]
    meta = top["metadata"]
    assert (meta["job_id"], meta["source"], meta["speaker"], meta["start"], meta["end"]) == (
        "job-1",
        "standup.wav",
        "maria",
        0.0,
        3.5,
    )
    assert meta["created_at"] == pytest.approx(recorded.timestamp())

    def ids(**filters: object) -> set[str]:
        return {str(r["id"]) for r in query(rag, collection, "meeting", top_k=10, filter=filters)}

    assert ids(job_id="job-2") == {"job-2@0.000", "job-2@3.500"}
    assert ids(speaker="tom") == {"job-1@3.500", "job-2@3.500"}
    assert ids(source="standup.wav", speaker="tom") == {"job-1@3.500"}
    assert ids(after=(recorded + timedelta(days=1)).isoformat()) == {"job-2@0.000", "job-2@3.500"}
    assert ids(before=(recorded + timedelta(seconds=2)).isoformat()) == {"job-1@0.000"}

    assert rag.http.delete("/v1/documents/job-2", params={"collection": collection}).status_code == 204
    assert ids(job_id="job-2") == set()
    assert rag.http.delete("/v1/documents/job-1@0.000", params={"collection": collection}).status_code == 204
    assert count(rag, collection) == 1


def test_recency_bias_reorders_two_equally_similar_memories(rag: Rag, collection: str) -> None:
    now = datetime.now(UTC)
    ingest(
        rag,
        collection,
        {
            "id": "old",
            "text": "The team meeting moved to Thursday.",
            "created_at": (now - timedelta(days=90)).isoformat(),
        },
        {
            "id": "new",
            "text": "The team meeting moved to Thursday!",
            "created_at": (now - timedelta(hours=1)).isoformat(),
        },
    )
    plain = query(rag, collection, "When is the team meeting?", top_k=2, recency_bias=0)
    assert abs(float(plain[0]["similarity"]) - float(plain[1]["similarity"])) < 0.05  # as good as each other
    biased = query(rag, collection, "When is the team meeting?", top_k=2, recency_bias=0.3)
    assert [r["metadata"]["doc_id"] for r in biased] == ["new", "old"]
    assert biased[0]["score"] > biased[1]["score"]
    assert biased[0]["recency"] > 0.99 > 0.05 > biased[1]["recency"]
    old_first = query(rag, collection, "The team meeting moved to Thursday.", top_k=2, recency_bias=0)
    assert old_first[0]["metadata"]["doc_id"] == "old"  # the exact text wins without recency...
    assert (
        query(rag, collection, "The team meeting moved to Thursday.", top_k=2, recency_bias=0.3)[0]["metadata"][
            "doc_id"
        ]
        == "new"
    )  # ...and recency reorders them


def test_delete_unknown_is_404(rag: Rag, collection: str) -> None:
    response = rag.http.delete("/v1/documents/nope", params={"collection": collection})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_token_ids_are_embedded_as_the_text_they_spell_and_counted(rag: Rag, mint: Mint) -> None:
    client = openai.OpenAI(base_url="http://rag/v1", api_key=mint("rag:read"), http_client=rag.client_of_app)
    text = client.embeddings.create(model="all-minilm-l6-v2", input="a cat on a mat")
    ids = [1037, 4937, 2006, 1037, 13523]  # MiniLM's WordPiece ids of "a cat on a mat"
    one = client.embeddings.create(model="all-minilm-l6-v2", input=ids)
    assert np.allclose(one.data[0].embedding, text.data[0].embedding, atol=1e-5)
    assert one.usage.prompt_tokens == 5 == one.usage.total_tokens
    two = client.embeddings.create(model="all-minilm-l6-v2", input=[ids, ids[:2]])
    assert len(two.data) == 2 and two.usage.prompt_tokens == 7
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.embeddings.create(model="all-minilm-l6-v2", input=[10_000_000])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="all-minilm-l6-v2", input=[-1])


def test_the_openai_client_gets_embeddings(rag: Rag, mint: Mint) -> None:
    client = openai.OpenAI(base_url="http://rag/v1", api_key=mint("rag:read"), http_client=rag.client_of_app)
    result = client.embeddings.create(model="all-minilm-l6-v2", input=["a cat on a mat", "a dog on a log"])
    vectors = [np.array(item.embedding) for item in result.data]
    assert [len(v) for v in vectors] == [384, 384]
    assert all(abs(np.linalg.norm(v) - 1) < 1e-3 for v in vectors)
    assert result.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="all-minilm-l6-v2", input="a cat on a mat", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vectors[0], atol=1e-5)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-large", input="x")
    card = client.models.retrieve("all-minilm-l6-v2")
    assert card.id == "all-minilm-l6-v2" and card.created > 1_600_000_000
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        client.embeddings.create(model="all-minilm-l6-v2", input="word " * 400)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/query", {"query": ""}),
        ("/v1/query", {"query": "   "}),
        ("/v1/query", {"query": "x", "top_k": 0}),
        ("/v1/query", {"query": "x", "top_k": 51}),
        ("/v1/query", {"query": "x", "filter": {"colour": "red"}}),
        ("/v1/query", {"query": "x", "recency_bias": 1.5}),
        ("/v1/documents", {"documents": []}),
        ("/v1/documents", {"documents": [{"text": ""}]}),
        ("/v1/documents", {"documents": [{"text": "ok", "metadata": {"nested": {"a": 1}}}]}),
        ("/v1/documents", {"documents": [{"text": "ok", "metadata": {"doc_id": "x"}}]}),
        ("/v1/documents", {"documents": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}),
        ("/v1/documents", {"documents": [{"text": "ok"}], "collection": "a"}),
        # Input that once got a 500, or broke Chroma for good (10,000 metadata keys).
        ("/v1/documents", {"documents": [{"text": "ok", "metadata": {f"k{i}": i for i in range(10_000)}}]}),
        ("/v1/documents", {"documents": [{"text": "ok", "metadata": {"$where": 1}}]}),
        ("/v1/documents", {"documents": [{"text": "ok", "metadata": {"$contains": "x"}}]}),
        ("/v1/documents", {"documents": [{"text": "ok", "metadata": {"": 1}}]}),
        ("/v1/documents", {"documents": [{"text": "ok", "metadata": {"\udc00": 1}}]}),
        ("/v1/documents", {"documents": [{"text": "ok", "metadata": {"a": "\udc00"}}]}),
        ("/v1/documents", {"documents": [{"text": "lone \udc00 surrogate"}]}),
        ("/v1/documents", {"documents": [{"text": "word " * 40_001}]}),  # over 200,000 characters
        ("/v1/documents", {"documents": [{"id": f"d{i}", "text": "word " * 20_000} for i in range(5)]}),
        ("/v1/query", {"query": "x" * 4_001}),
        ("/v1/embeddings", {"input": "\udc00", "model": "all-minilm-l6-v2"}),
        (
            "/v1/segments",
            {
                "job_id": "j",
                "source": "s",
                "recorded_at": "yesterday",
                "segments": [{"text": "x", "start": 0, "end": 1}],
            },
        ),
        (
            "/v1/segments",
            {
                "job_id": "j",
                "source": "s",
                "recorded_at": "2026-01-01T00:00:00Z",
                "segments": [{"text": "x", "start": 2, "end": 1}],
            },
        ),
        (  # a place a week past the start of the recording: no time a calendar has (fuzzed)
            "/v1/segments",
            {
                "job_id": "j",
                "source": "s",
                "recorded_at": "2026-01-01T00:00:00Z",
                "segments": [{"text": "x", "start": 1.6e16, "end": 1.7e16}],
            },
        ),
    ],
)
def test_bad_input_is_400_and_stores_nothing(rag: Rag, collection: str, path: str, body: dict[str, object]) -> None:
    before = rag.http.get("/v1/stats").json()["total"]
    # json.dumps escapes lone surrogates (\udc00), as a hostile client would send them.
    response = rag.http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.elapsed.total_seconds() < 2  # refused before any work
    assert rag.http.get("/v1/stats").json()["total"] == before
    stored = rag.http.post("/v1/documents", json={"documents": [{"text": "still writable"}], "collection": collection})
    assert stored.status_code == 200  # and the store takes the next write


def test_a_batch_with_one_bad_document_stores_nothing(rag: Rag, collection: str) -> None:
    response = rag.http.post(
        "/v1/documents",
        json={"collection": collection, "documents": [{"text": "fine"}, {"text": "also fine"}, {"text": ""}]},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "documents.2.text"
    assert count(rag, collection) == 0


def test_invalid_utf8_and_oversized_bodies(rag: Rag) -> None:
    bad = rag.http.post("/v1/query", content=b'{"query": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert bad.status_code == 400
    big = rag.http.post("/v1/documents", json={"documents": [{"text": "x" * (2 * 1024 * 1024)}]})
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "payload_too_large"


def test_scopes(rag: Rag, mint: Mint) -> None:
    reader = rag.client(mint("rag:read"))
    assert reader.post("/v1/documents", json={"documents": [{"text": "x"}]}).status_code == 403
    assert reader.post("/v1/query", json={"query": "x"}).status_code == 200
    assert rag.client().post("/v1/query", json={"query": "x"}).status_code == 401


def test_every_route_answers_in_process_as_documented(rag: Rag, mint: Mint) -> None:
    """Each operation of /openapi.json asked once with the least a client sends (an empty
    body, ``x`` for an id), with every scope: no 5xx, no 405, each status documented."""
    client = rag.client_of_app
    document = client.get("/openapi.json", headers={"Authorization": f"Bearer {mint()}"}).json()
    client.headers["Authorization"] = f"Bearer {mint()}"
    try:
        answers = walk_sync(client, document)
    finally:
        del client.headers["Authorization"]
    assert misanswered(answers, document) == []
    assert len(answers) >= 12
