"""Conversations kept by the LLM service: each its subject's own, in Redis, continued by
chat requests (streamed or not, OpenAI's and the seed's), summarized when too long."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from harness.servers import RedisServer
from shared.sse_reader import read_json
from tests.conftest import Mint
from tests.services.llm.conftest import Llm, StartLlm

pytestmark = pytest.mark.slow


def stored(redis_server: RedisServer) -> dict[str, str]:
    """Conversations (and limits) in the test Redis, under a prefix of their own."""
    return {"BATON_REDIS_URL": redis_server.url, "BATON_KEY_PREFIX": f"conv-{secrets.token_hex(4)}:"}


def as_user(llm: Llm, mint: Mint, sub: str) -> httpx.Client:
    token = mint("chat", sub=sub)
    return httpx.Client(base_url=llm.url, headers={"Authorization": f"Bearer {token}"}, timeout=300)


def say(http: httpx.Client, model: str, conversation: str, content: str, **options: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "conversation": conversation}
    return http.post("/v1/chat/completions", json={"max_tokens": 12, "temperature": 0, **body, **options})


def test_a_conversation_is_its_subjects_own_is_continued_and_survives_a_restart(
    start_llm: StartLlm, redis_server: RedisServer, mint: Mint
) -> None:
    env = stored(redis_server)
    llm = start_llm(env_extra=env)
    alice, mallory = as_user(llm, mint, "alice"), as_user(llm, mint, "mallory")
    created = alice.post("/v1/conversations", json={"title": "trip"})
    assert created.status_code == 201
    conversation = created.json()["id"]
    assert created.json()["title"] == "trip"
    assert [c["id"] for c in alice.get("/v1/conversations").json()["data"]] == [conversation]

    first = say(alice, llm.model, conversation, "My name is Ada.")
    assert first.status_code == 200, first.text
    answer = first.json()["choices"][0]["message"]["content"]
    body = {
        "model": llm.model,
        "messages": [{"role": "user", "content": "What is my name?"}],
        "conversation": conversation,
        "stream": True,
        "max_tokens": 12,
    }
    with alice.stream("POST", "/v1/chat/completions", json=body) as stream:
        assert stream.status_code == 200
        pieces = [e["choices"][0]["delta"].get("content") or "" for e in read_json(stream.iter_lines()) if e["choices"]]
    thanks = {"messages": [{"role": "user", "content": "Thanks."}], "conversation_id": conversation, "max_tokens": 12}
    seed = alice.post("/chat", json=thanks)
    assert seed.status_code == 200, seed.text

    kept = alice.get(f"/v1/conversations/{conversation}").json()
    assert [(m["role"], m["content"]) for m in kept["messages"][:3]] == [
        ("user", "My name is Ada."),
        ("assistant", answer),
        ("user", "What is my name?"),
    ]
    assert (kept["messages"][3]["role"], kept["messages"][3]["content"]) == ("assistant", "".join(pieces))
    assert [m["role"] for m in kept["messages"][4:]] == ["user", "assistant"]
    assert kept["summary"] is None and kept["summarized_messages"] == 0

    # Another subject: not found, whatever it tries; it lists nothing.
    assert mallory.get(f"/v1/conversations/{conversation}").status_code == 404
    assert mallory.delete(f"/v1/conversations/{conversation}").status_code == 404
    refused = say(mallory, llm.model, conversation, "What is her name?")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert mallory.get("/v1/conversations").json() == {"data": []}
    assert alice.get("/v1/conversations/conv_nonsense").status_code == 404

    # A new instance of the service (the old one stopped) finds it as it was: it lives in Redis.
    llm.service.stop()
    again = start_llm(env_extra=env)
    alice_again = as_user(again, mint, "alice")
    assert alice_again.get(f"/v1/conversations/{conversation}").json() == kept
    assert alice_again.delete(f"/v1/conversations/{conversation}").status_code == 204
    assert alice_again.get(f"/v1/conversations/{conversation}").status_code == 404


def test_conversations_and_their_messages_are_bounded(
    start_llm: StartLlm, redis_server: RedisServer, mint: Mint
) -> None:
    llm = start_llm(env_extra=stored(redis_server), max_conversations=2, max_conversation_messages=3)
    user = as_user(llm, mint, "bounded")
    ids = [user.post("/v1/conversations", json={}).json()["id"] for _ in range(2)]
    third = user.post("/v1/conversations", json={})
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_conversations"
    assert user.post("/v1/conversations", json={"title": "x" * 201}).status_code == 400
    assert say(user, llm.model, ids[0], "One.").status_code == 200  # 2 messages of 3
    full = say(user, llm.model, ids[0], "Two.")
    assert full.status_code == 429 and full.json()["error"]["code"] == "conversation_full"
    assert len(user.get(f"/v1/conversations/{ids[0]}").json()["messages"]) == 2  # nothing half-stored


FACTS = [
    ("Remember this: my boat is called Blue Heron.", "What is my boat called?", "heron"),
    ("Remember this: my dog is named Biscuit.", "What is my dog's name?", "biscuit"),
    ("Remember this: my sister lives in Lisbon.", "Where does my sister live?", "lisbon"),
    ("Remember this: my favourite colour is green.", "What is my favourite colour?", "green"),
]
"""A fact stated in turn 1, the question at turn 30, and the word its answer must hold."""


def test_a_long_conversation_is_summarized_never_cut(
    start_llm: StartLlm, redis_server: RedisServer, mint: Mint
) -> None:
    llm = start_llm(env_extra=stored(redis_server), context_size=768)
    user = as_user(llm, mint, "talker")
    kept_in_summary, answered = [], []
    for fact, question, word in FACTS:
        conversation = user.post("/v1/conversations", json={"title": word}).json()["id"]
        assert say(user, llm.model, conversation, fact).status_code == 200
        for turn in range(2, 30):
            answer = say(user, llm.model, conversation, f"Count from {turn} to {turn + 3}.", max_tokens=24)
            assert answer.status_code == 200, answer.text  # never 400 context_length_exceeded: summarized
            assert "dropped" not in str(answer.json()["baton"]["warnings"])
        last = say(user, llm.model, conversation, question, max_tokens=16)
        assert last.status_code == 200
        kept = user.get(f"/v1/conversations/{conversation}").json()
        assert len(kept["messages"]) == 60  # every turn stored, none cut
        assert 0 < kept["summarized_messages"] < 60 and kept["summary"]
        assert last.json()["usage"]["summarized_messages"] == kept["summarized_messages"]
        if word in kept["summary"].lower():
            kept_in_summary.append(word)
        if word in last.json()["choices"][0]["message"]["content"].lower():
            answered.append(word)
        print(f"{word}: summary of {kept['summarized_messages']} messages: {kept['summary'][:200]!r}")
    assert llm.metric("llm_conversation_summaries_total") >= len(FACTS)
    print(
        f"facts of turn 1 kept in the summary: {len(kept_in_summary)} of {len(FACTS)} {kept_in_summary}; "
        f"answered at turn 30: {len(answered)} of {len(FACTS)} {answered}"
    )
    # The bundled SmolLM2-135M carries the facts into its summaries (4 of 4 here on
    # 2026-11-23) but answers from them less often (2 of 4: the dog and the sister). That
    # is the model's doing (it has a thirtieth of the parameters of the Gemma 3 4B the
    # stack serves), so the bounds leave it room.
    assert len(kept_in_summary) >= 3
    assert answered
