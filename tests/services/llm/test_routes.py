"""Every route of the LLM service through its app built in this process (``create_app``
from the settings its process would read) over httpx's ASGITransport: the bundled
SmolLM2 in the batching engine, a real Redis for conversations; the card granted at once
(no coordinator) and RAG unreachable (answers say so). The GPU hand-over, the backends
and the fuzzer are in the slow tier."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from baton.demo.databases import build
from harness.routes import misanswered, walk
from harness.samples import WEATHER_TOOL
from harness.servers import RedisServer, environment, free_port
from services.llm.app import create_app
from shared.openapi import honest_openapi
from shared.sse_reader import read_json
from tests.conftest import Mint


class App:
    def __init__(self, app: Any, mint: Mint) -> None:
        self.app = app
        self.mint = mint

    def client(self, *scopes: str, sub: str = "tester") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.mint(*scopes, sub=sub)}"} if scopes else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://llm", headers=headers, timeout=120
        )


@pytest.fixture(scope="module")
async def llm_app(
    redis_server: RedisServer, mint: Mint, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[App]:
    databases = build(tmp_path_factory.mktemp("sql"))
    env = {
        "GEMMA_COORDINATE": "false",
        "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: RAG down
        "GEMMA_CONTEXT_SIZE": "2048",
        "GEMMA_PARALLEL": "4",
        "GEMMA_SQL_DATABASES": json.dumps({name: f"sqlite:///{path}" for name, path in databases.items()}),
        "GEMMA_SQL_DEFAULT_DATABASE": "inventory",
        "BATON_REDIS_URL": redis_server.url,
        "BATON_KEY_PREFIX": f"llm-routes-{secrets.token_hex(4)}:",
    }
    with environment(env):
        app = create_app()
    async with app.router.lifespan_context(app):
        yield App(app, mint)


@pytest.fixture
async def http(llm_app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with llm_app.client("chat") as client:
        yield client


def asked(content: str, **options: Any) -> dict[str, Any]:
    return {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": content}], **options}


async def test_models_and_the_ops_routes(llm_app: App, http: httpx.AsyncClient) -> None:
    assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == ["smollm2-135m-instruct"]
    assert (await http.get("/health")).json()["status"] == "ok"
    assert (await http.get("/ready")).status_code == 200
    shown = (await http.get("/v1/info")).json()
    assert shown["limits"]["parallel"] == 4 and "model_path" not in shown
    assert (await http.get("/metrics")).status_code == 403
    async with llm_app.client("admin") as admin:
        assert "model_path" in (await admin.get("/v1/info")).json()
        assert "llm_batch_slots 4.0" in (await admin.get("/metrics")).text
        paths = set((await admin.get("/openapi.json")).json()["paths"])
    assert {"/v1/chat/completions", "/v1/conversations", "/v1/sql", "/chat", "/chat/stream", "/query", "/info"} <= paths
    async with llm_app.client() as nobody:
        assert (await nobody.post("/v1/chat/completions", json=asked("Hi"))).status_code == 401
    async with llm_app.client("rag:read") as reader:
        assert (await reader.post("/v1/chat/completions", json=asked("Hi"))).status_code == 403


async def test_a_completion_whole_and_streamed(http: httpx.AsyncClient) -> None:
    greedy = {"max_tokens": 12, "temperature": 0, "rag": {"top_k": 3}}
    whole = await http.post("/v1/chat/completions", json=asked("Count from 1 to 5.", **greedy))
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] <= 12 and body["baton"]["device"] == "cpu"
    assert any("memories unavailable" in warning for warning in body["baton"]["warnings"])  # RAG is down
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    streamed = await http.post("/v1/chat/completions", json=asked("Count from 1 to 5.", **greedy, **usage))
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    chunks = list(read_json(streamed.text.splitlines()))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == body["choices"][0]["message"]["content"]  # greedy: the same answer
    assert chunks[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]


async def test_a_required_tool_call_and_a_bad_request(http: httpx.AsyncClient) -> None:
    called = await http.post(
        "/v1/chat/completions",
        json=asked("What is the weather in Paris?", tools=[WEATHER_TOOL], tool_choice="required", temperature=0),
    )
    assert called.status_code == 200, called.text
    choice = called.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == WEATHER_TOOL["function"]["name"]
    json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    refused = await http.post("/v1/chat/completions", json=asked("Hi", temperature=2.5))
    assert refused.status_code == 400
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}


async def test_the_seed_chat_shapes(http: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
    answer = await http.post("/chat", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"] and answer.json()["usage"]["completion_tokens"] > 0
    stream = await http.post("/chat/stream", json=body)
    assert stream.status_code == 200
    events = list(read_json(stream.text.splitlines()))
    assert events[-1]["done"] is True
    assert "".join(e["token"] for e in events[:-1]) == answer.json()["response"]


async def test_a_conversation_is_kept_continued_and_its_owners_alone(llm_app: App, http: httpx.AsyncClient) -> None:
    created = await http.post("/v1/conversations", json={"title": "pets"})
    assert created.status_code == 201
    conversation = created.json()["id"]
    said = await http.post(
        "/v1/chat/completions", json=asked("My dog is called Biscuit.", max_tokens=8, conversation=conversation)
    )
    assert said.status_code == 200, said.text
    kept = (await http.get(f"/v1/conversations/{conversation}")).json()
    assert [m["role"] for m in kept["messages"]] == ["user", "assistant"]
    assert kept["messages"][0]["content"] == "My dog is called Biscuit."
    assert conversation in [c["id"] for c in (await http.get("/v1/conversations")).json()["data"]]
    async with llm_app.client("chat", sub="mallory") as mallory:
        assert (await mallory.get(f"/v1/conversations/{conversation}")).status_code == 404
        assert (await mallory.delete(f"/v1/conversations/{conversation}")).status_code == 404
    assert (await http.delete(f"/v1/conversations/{conversation}")).status_code == 204
    assert (await http.get(f"/v1/conversations/{conversation}")).status_code == 404


async def test_text_to_sql_and_its_seed_shapes(http: httpx.AsyncClient) -> None:
    question = {"question": "How many workspaces are there?", "database": "inventory", "execute": True}
    answer = await http.post("/v1/sql", json=question)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["sql"].startswith("SELECT ") and body["columns"] and body["rows"] is not None, body
    seed = await http.post("/query", json={"prompt": "Show me all active workspaces", "max_tokens": 100})
    assert seed.status_code == 200 and seed.json()["response"].startswith("SELECT ")
    info = (await http.get("/info")).json()
    assert info["model"] == "smollm2-135m-instruct" and info["context_size"] == 2048
    unknown = await http.post("/v1/sql", json={"question": "How many?", "database": "nope"})
    assert unknown.status_code in (400, 404) and unknown.json()["error"]["param"] == "database"


async def test_every_route_answers_in_process_as_documented(llm_app: App) -> None:
    """Each operation of /openapi.json asked once with the least a client sends (an empty
    body, ``x`` for an id), with every scope: no 5xx, no 405, each status documented."""
    async with llm_app.client() as http:
        document = honest_openapi(llm_app.app)
        http.headers["Authorization"] = f"Bearer {llm_app.mint()}"
        answers = await walk(http, document)
    assert misanswered(answers, document) == []
    assert len(answers) >= 20
