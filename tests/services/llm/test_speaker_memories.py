"""Questions about a person: "What did Alice say about the budget?" is answered from
Alice's segments, never from another speaker's on the same topic. The LLM's memory
lookup against the real RAG app (Chroma, MiniLM), built in this process."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from harness.servers import RedisServer
from services.llm.memories import Memories, named_in
from services.rag.app import create_app
from services.rag.settings import RAGSettings
from shared.auth import ON_BEHALF_OF
from shared.client import ServiceClient
from shared.settings import AuthSettings, LimitSettings
from tests.conftest import Mint

MEETING = [
    ("Alice", 10.0, "The budget for the Harbor project has to shrink by ten percent before March."),
    ("Bob", 20.0, "I disagree about the budget; the Harbor project needs more money for testing."),
    ("Alice", 30.0, "The new office opens in June, and everyone moves in the same week."),
    ("Bob", 40.0, "Lunch on Friday is at the Italian place near the station."),
]


@pytest.fixture(scope="module")
async def memories(
    tmp_path_factory: pytest.TempPathFactory, mint: Mint, redis_server: RedisServer, auth_settings: AuthSettings
) -> AsyncIterator[Memories]:
    workdir: Path = tmp_path_factory.mktemp("rag-speakers")
    settings = RAGSettings(
        auth=auth_settings,
        chroma_path=workdir / "chroma",
        journal_path=workdir / "journal.sqlite3",
        limits=LimitSettings(redis_url=redis_server.url, key_prefix=f"rag-{secrets.token_hex(4)}:"),
    )
    app = create_app(settings)
    token = mint("rag:read", "rag:write", sub="service:llm")
    async with app.router.lifespan_context(app):
        client = ServiceClient("http://rag", lambda: token, transport=httpx.ASGITransport(app=app))
        for owner in ("alice-owner", "other-owner"):
            body = {
                "job_id": f"job-{owner}",
                "source": "meeting.ogg",
                "recorded_at": "2026-12-01T10:00:00Z",
                "segments": [{"text": t, "start": s, "end": s + 8, "speaker": who} for who, s, t in MEETING],
            }
            stored = await client.request("POST", "/v1/segments", json=body, headers={ON_BEHALF_OF: owner})
            assert stored.status_code == 200, stored.text
        yield Memories(client, timeout_s=30)
        await client.aclose()


def test_the_names_a_question_may_mean() -> None:
    assert named_in("What did Alice say about the budget?") == ["Alice"]
    assert named_in("Did Mary Ann and Bob agree? What about Carol, Dave and Eve?") == ["Mary Ann", "Bob", "Carol"]
    assert named_in("what did alice say") == []


async def test_a_question_naming_a_speaker_cites_only_that_speakers_segments(memories: Memories) -> None:
    found = await memories.search("What did Alice say about the budget?", 3, None, None, "alice-owner")
    assert found.passages and {p.metadata["speaker"] for p in found.passages} == {"Alice"}
    assert "budget" in found.passages[0].text
    assert found.passages[0].label().startswith("Alice, meeting.ogg at 0:10-0:18")
    bob = await memories.search("What did Bob say about the budget?", 3, None, None, "alice-owner")
    assert {p.metadata["speaker"] for p in bob.passages} == {"Bob"} and "disagree" in bob.passages[0].text
    # Without a name, both speakers' segments on the topic are found.
    anyone = await memories.search("What was said about the budget?", 4, None, None, "alice-owner")
    assert {p.metadata["speaker"] for p in anyone.passages} == {"Alice", "Bob"}
    # A capitalised word that is nobody's name changes nothing.
    harbor = await memories.search("What about Harbor money?", 4, None, None, "alice-owner")
    assert {p.metadata["speaker"] for p in harbor.passages} == {"Alice", "Bob"}
