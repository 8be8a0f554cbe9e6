"""The flow the stack exists for, on the native launcher: speech becomes memory, a
question interrupts a transcription, the GPU passes back and forth, nothing is lost."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from harness.launched import LaunchedStack
from harness.servers import wait_until
from harness.speech import long_meeting
from shared.sse_reader import read_json

pytestmark = pytest.mark.slow

SPEECH = Path(__file__).resolve().parents[1] / "baton" / "demo" / "speech"
QUESTION = "What is the new deadline for the Harbor report?"


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The meeting three times over: about three and a half minutes."""
    return long_meeting(tmp_path_factory.mktemp("audio"), 3)[0]


def submit(stack: LaunchedStack, path: Path) -> str:
    with stack.client("transcription") as http, path.open("rb") as handle:
        response = http.post("/v1/jobs", files={"file": (path.name, handle)})
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


POLL_S = 0.25
"""How often a test asks after a job: the stack's user is rate-limited like any other."""


def job(stack: LaunchedStack, job_id: str) -> dict[str, Any]:
    with stack.client("transcription") as http:
        response = http.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_question_interrupts_a_transcription_and_nothing_is_lost(
    launched: LaunchedStack, long_recording: Path
) -> None:
    # An earlier transcript, alone: the reference, and the memories the question will use.
    earlier = submit(launched, long_recording)
    wait_until(lambda: job(launched, earlier)["indexed"], 300, "the earlier transcript to be indexed", POLL_S)
    reference = job(launched, earlier)

    # The same recording again; once it runs and has stored a checkpoint, ask.
    current = submit(launched, long_recording)
    wait_until(
        lambda: job(launched, current)["state"] == "running" and job(launched, current)["segments"],
        120,
        "the second job to be under way",
        POLL_S,
    )
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "max_tokens": 60,
        "temperature": 0,
        "rag": {"top_k": 3},
    }
    asked_at = time.time()
    pieces, final = [], {}
    fresh = {"Cache-Control": "no-cache"}  # it must run on the model: it interrupts the job
    with (
        launched.client("llm") as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=fresh) as response,
    ):
        assert response.status_code == 200
        for event in read_json(response.iter_lines()):
            assert "error" not in event, event
            choice = event["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            if choice["finish_reason"]:
                final = event
    answer = "".join(pieces)
    assert answer.strip()
    assert any(s["metadata"].get("job_id") == earlier for s in final["sources"]), final["sources"]
    assert any("deadline" in s["text"].lower() for s in final["sources"])

    # The interrupted job ends with exactly the transcript of the uninterrupted one.
    wait_until(lambda: job(launched, current)["state"] == "done", 300, "the interrupted job to finish", POLL_S)
    finished = job(launched, current)
    assert finished["yields"] >= 1
    assert finished["segments"] == reference["segments"]

    # The coordinator's history: transcription held (n) -> chat asked -> transcription
    # yielded -> chat granted (n+1) -> chat released -> transcription resumed (n+2).
    with launched.client("coordinator") as http:
        history = list(reversed(http.get("/v1/history", params={"limit": 50}).json()))
    chat = next(h for h in history if h["holder"] == "llm" and h["requested_at"] >= asked_at - 1)
    before = next(h for h in reversed(history) if h["fence"] < chat["fence"])
    after = next(h for h in history if h["fence"] > chat["fence"])
    assert (before["holder"], before["priority"], before["end"]) == ("transcription", "batch", "released")
    assert (after["holder"], after["priority"]) == ("transcription", "batch")
    assert before["fence"] < chat["fence"] < after["fence"]
    assert chat["requested_at"] < before["ended_at"] <= chat["granted_at"]  # asked, then yielded, then granted
    assert chat["end"] == "released" and chat["ended_at"] <= after["granted_at"]  # released, then resumed
    spans = sorted((h["granted_at"], h["ended_at"] or time.time()) for h in history)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans)), "two holders at once"
    fences = [h["fence"] for h in sorted(history, key=lambda h: h["granted_at"])]
    assert fences == sorted(fences) and len(set(fences)) == len(fences)


def test_the_demo_runs_on_a_running_stack(launched: LaunchedStack) -> None:
    result = launched.baton("demo", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1. Transcribing the bundled meeting recording" in out
    assert "Sources:" in out and "meeting.ogg" in out
    assert "The answer cites" in out and "cites 0 " not in out
    assert "Stopping the stack" not in out  # it did not start this one, so it leaves it running


def test_the_seed_text_to_sql_answers_on_the_launched_stack(launched: LaunchedStack) -> None:
    """The launcher built the example databases and named them: /query needs no setup."""
    with launched.client("llm") as http:
        seed = http.post("/query", json={"prompt": "Show me all active workspaces"})
        assert seed.status_code == 200, seed.text
        assert seed.json()["response"].startswith("SELECT ") and "FROM workspaces" in seed.json()["response"]
        answer = http.post(
            "/v1/sql", json={"question": "How many products are there?", "database": "shop", "execute": True}
        )
        assert answer.status_code in (200, 422), answer.text
        if answer.status_code == 200:
            assert answer.json()["columns"] and answer.json()["rows"] is not None
    assert (launched.run_dir / "sql" / "inventory.db").is_file()


def test_one_openai_client_reaches_every_service_through_the_gateway(launched: LaunchedStack) -> None:
    """One base_url: the gateway. Chat streamed, the bundled meeting transcribed, an
    embedding, and every service's models in one list."""
    client = openai.OpenAI(base_url=f"{launched.url('gateway')}/v1", api_key=launched.info["token"])
    ids = [m.id for m in client.models.list()]
    assert "whisper-1" in ids and "all-minilm-l6-v2" in ids and len(ids) >= 4
    stream = client.chat.completions.create(
        model=ids[0], messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, stream=True
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed, not one buffered piece
    with (SPEECH / "meeting.ogg").open("rb") as recording:
        transcript = client.audio.transcriptions.create(model="whisper-1", file=recording)
    assert "harbor" in transcript.text.lower()
    embedded = client.embeddings.create(model="all-minilm-l6-v2", input=["the Harbor report"])
    assert len(embedded.data[0].embedding) == 384
