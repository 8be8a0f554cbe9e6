"""The clients peers are tested against, as real clients of the LLM app built in this
process (``in_process``, tests/services/llm/conftest.py): LiteLLM here, LlamaIndex's
``OpenAILike`` in a virtual environment of its own (its OpenAI integration wants
``openai<3``, the Agents SDK ``openai>=3``: harness/client_venv.py)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from harness.apt import Unavailable
from harness.client_venv import client_python
from tests.services.llm.conftest import InProcess

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def answered(served: InProcess, route: str) -> float:
    """Requests the app answered 200 on ``route`` so far (its own metrics)."""
    registry = served.app.state.parts.base.metrics.registry
    return float(
        registry.get_sample_value("http_requests_total", {"route": route, "method": "POST", "status": "200"}) or 0
    )


@pytest.fixture(scope="module")
def litellm(monkeypatch_module: pytest.MonkeyPatch) -> Any:
    monkeypatch_module.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub at import
    monkeypatch_module.setenv("LITELLM_TELEMETRY", "False")
    import litellm

    return litellm


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_litellm_completion_stream_tools_and_text_completion(in_process: InProcess, litellm: Any) -> None:
    where = {"api_base": str(in_process.client.base_url), "api_key": in_process.client.api_key}
    model = f"openai/{in_process.model}"
    said = litellm.completion(model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=6, **where)
    assert said.choices[0].message.content and said.usage.completion_tokens <= 6
    pieces = litellm.completion(
        model=model, messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, stream=True, **where
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces)
    called = litellm.completion(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
        **where,
    )
    (call,) = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    before = answered(in_process, "/v1/completions")
    text = litellm.text_completion(model=model, prompt="The capital of France is", max_tokens=5, **where)
    assert text.choices[0].text and answered(in_process, "/v1/completions") == before + 1


LLAMA_INDEX = """
import json, sys
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

base, key, model = sys.argv[1:4]
common = dict(model=model, api_base=base, api_key=key, max_tokens=8, temperature=0, context_window=2048)
chat = OpenAILike(is_chat_model=True, **common)
raw = OpenAILike(is_chat_model=False, **common)
print(json.dumps({
    "chat": chat.chat([ChatMessage(role="user", content="Say hi.")]).message.content,
    "chat_complete": chat.complete("Say hi.").text,
    "complete": raw.complete("The capital of France is").text,
    "stream_complete": "".join(r.delta or "" for r in raw.stream_complete("One, two,")),
}))
"""


@pytest.mark.slow  # its own virtual environment, made once (about a minute)
def test_llama_index_openai_like_as_chat_model_and_as_completion_model(in_process: InProcess) -> None:
    try:
        python = client_python(["llama-index-llms-openai-like>=0.8,<1", "openai>=2,<3"])
    except Unavailable as exc:
        pytest.skip(str(exc))
    chats, completions = answered(in_process, "/v1/chat/completions"), answered(in_process, "/v1/completions")
    run = subprocess.run(
        [str(python), "-c", LLAMA_INDEX, str(in_process.client.base_url), in_process.client.api_key, in_process.model],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    said = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(said.values()), said
    assert answered(in_process, "/v1/chat/completions") == chats + 2  # is_chat_model=True: chat
    assert answered(in_process, "/v1/completions") == completions + 2  # is_chat_model=False: completions
