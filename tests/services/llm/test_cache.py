"""The response cache: a deterministic request asked again is answered from it, streamed
or not, without the model or the GPU; never across users for a personal prompt."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from harness.servers import Served
from shared.sse_reader import read_json
from tests.conftest import Mint
from tests.services.llm.conftest import Llm

pytestmark = pytest.mark.slow


def ask(llm: Llm, token: str, content: str, headers: dict[str, str] | None = None, **options: Any) -> httpx.Response:
    body = {"model": llm.model, "messages": [{"role": "user", "content": content}], "max_tokens": 16, **options}
    headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    return httpx.post(f"{llm.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def streamed(llm: Llm, token: str, content: str) -> tuple[str, str]:
    body = {
        "model": llm.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream("POST", f"{llm.url}/v1/chat/completions", json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200
        events = list(read_json(response.iter_lines()))
        marked = response.headers["X-Baton-Cache"]
    return marked, "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def test_a_deterministic_request_asked_again_is_a_hit_streamed_or_not(llm: Llm, mint: Mint) -> None:
    token = mint("chat", sub="cache-user")
    question = "Name three fruits."
    first = ask(llm, token, question, temperature=0)
    assert first.status_code == 200 and first.headers["X-Baton-Cache"] == "miss"
    hits_before = llm.metric("llm_response_cache_total", result="hit")

    again = ask(llm, token, question, temperature=0)
    assert again.headers["X-Baton-Cache"] == "hit"
    text = first.json()["choices"][0]["message"]["content"]
    assert again.json()["choices"][0]["message"]["content"] == text
    assert again.json()["baton"]["device"] == "cache" and again.json()["baton"]["gpu_wait_time"] == 0
    assert again.json()["usage"] == first.json()["usage"]
    assert streamed(llm, token, question) == ("hit", text)
    assert llm.metric("llm_response_cache_total", result="hit") == hits_before + 2

    fresh = ask(llm, token, question, temperature=0, headers={"Cache-Control": "no-cache"})
    assert fresh.headers["X-Baton-Cache"] == "miss"
    assert llm.metric("llm_response_cache_total", result="bypass") >= 1
    sampled = ask(llm, token, question, temperature=0.9)  # random: never cached, never served from it
    assert ask(llm, token, question, temperature=0.9).headers["X-Baton-Cache"] == "miss"
    assert sampled.headers["X-Baton-Cache"] == "miss"
    seeded = ask(llm, token, question, temperature=0.9, seed=11)
    assert ask(llm, token, question, temperature=0.9, seed=11).headers["X-Baton-Cache"] == "hit"
    assert seeded.headers["X-Baton-Cache"] == "miss"


def test_another_user_never_gets_a_hit_on_a_personal_prompt(llm: Llm, gpu_stack: dict[str, Served], mint: Mint) -> None:
    writer = httpx.Client(
        base_url=gpu_stack["rag"].url, headers={"Authorization": f"Bearer {mint('rag:write', sub='carol')}"}
    )
    # A code no number in the answer's timings can spell ("318" once matched 0.3184 s).
    fact = "Carol's locker code at the Harbor office is QX-318."
    assert writer.post("/v1/documents", json={"documents": [{"id": "locker", "text": fact}]}).status_code == 200
    question = "What is Carol's locker code?"
    carol, dave = mint("chat", "rag:read", sub="carol"), mint("chat", "rag:read", sub="dave")
    options: dict[str, Any] = {"temperature": 0, "rag": {"top_k": 3}}

    assert ask(llm, carol, question, **options).headers["X-Baton-Cache"] == "miss"
    mine = ask(llm, carol, question, **options)
    assert mine.headers["X-Baton-Cache"] == "hit"
    assert "QX-318" in str(mine.json()["sources"])  # her memory is in the prompt: personal
    theirs = ask(llm, dave, question, **options)
    assert theirs.headers["X-Baton-Cache"] == "miss"
    assert theirs.json()["sources"] == [] and "QX-318" not in theirs.text
