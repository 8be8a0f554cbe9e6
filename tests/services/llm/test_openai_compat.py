"""What OpenAI's clients send and expect, through the official SDK against the LLM app
built in this process (the bundled SmolLM2 in the batching engine) and served over real
HTTP from a thread: nulls that mean the default, log-probabilities, token biases, the
usage of a stream cut by max_tokens, and models retrieved by id."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from harness.servers import RedisServer, UvicornThread, environment, free_port
from services.llm.app import create_app
from tests.conftest import Mint


class Served:
    def __init__(self, app: Any, server: UvicornThread, token: str) -> None:
        self.app = app
        self.server = server
        self.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token, max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def tokens(self, text: str) -> list[int]:
        return list(self.app.state.parts.engine.vocabulary.tokens(text))

    def ask(self, content: str, **options: Any) -> Any:
        messages: Any = [{"role": "user", "content": content}]
        return self.client.chat.completions.create(model=self.model, messages=messages, **options)


@pytest.fixture(scope="module")
def llm(redis_server: RedisServer, mint: Mint) -> Iterator[Served]:
    env = {
        "GEMMA_COORDINATE": "false",
        "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: RAG down
        "GEMMA_CONTEXT_SIZE": "2048",
        "GEMMA_PARALLEL": "4",
        "BATON_REDIS_URL": redis_server.url,
        "BATON_KEY_PREFIX": f"llm-compat-{secrets.token_hex(4)}:",
    }
    with environment(env):
        app = create_app()
    with UvicornThread(app) as server:
        yield Served(app, server, mint("chat", sub="compat"))


GREEDY = {"temperature": 0, "max_tokens": 8}


def test_null_means_the_default_for_every_nullable_field(llm: Served) -> None:
    nulls = {
        name: None for name in ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "seed")
    }
    answer = llm.client.chat.completions.create(
        model=llm.model,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
        extra_body=nulls | {"logprobs": None, "top_logprobs": None, "stop": None, "logit_bias": None},
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens <= 4


def test_logprobs_in_openais_shape_greedy_picks_the_likeliest(llm: Served) -> None:
    answer = llm.ask("Name a colour.", logprobs=True, top_logprobs=3, **GREEDY)
    entries = answer.choices[0].logprobs.content
    assert answer.usage is not None and len(entries) == answer.usage.completion_tokens > 0
    assert "".join(e.token for e in entries) == answer.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob)  # greedy: the likeliest
    plain = llm.ask("Name a colour.", **GREEDY)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == answer.choices[0].message.content


def test_streamed_logprobs_and_the_usage_of_a_stream_cut_by_max_tokens(llm: Served) -> None:
    stream = llm.ask(
        "Write a long story about a dog.",
        stream=True,
        logprobs=True,
        stream_options={"include_usage": True},
        temperature=0,
        max_tokens=8,
    )
    chunks = list(stream)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8 == len(entries)
    assert "".join(e.token for e in entries) == text


def test_logit_bias_changes_a_greedy_answer(llm: Served) -> None:
    question = "What is the capital of France?"
    first = llm.ask(question, logprobs=True, **GREEDY).choices[0]
    banned = llm.tokens(first.logprobs.content[0].token)
    assert len(banned) == 1  # the first token's text reads back as that one token
    biased = llm.ask(question, logprobs=True, logit_bias={str(banned[0]): -100}, **GREEDY).choices[0]
    assert biased.logprobs.content[0].token != first.logprobs.content[0].token
    (favoured,) = llm.tokens("Blue")
    assert llm.ask(question, logit_bias={str(favoured): 100}, **GREEDY).choices[0].message.content.startswith("Blue")


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"logit_bias": {"10000000": 5}}, "logit_bias"),
        ({"logit_bias": {"hello": 5}}, "logit_bias"),
        ({"logit_bias": {"12": 500}}, "logit_bias"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, None),
        ({"functions": [{"name": "f"}]}, None),
        ({"n": 9}, "n"),
    ],
)
def test_what_cannot_be_honoured_is_400(llm: Served, options: dict[str, Any], param: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        llm.ask("Hi", max_tokens=2, extra_body=options)
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    if param is not None:
        assert body["param"] == param


def test_a_model_is_retrieved_by_id_with_the_time_its_file_was_written(llm: Served) -> None:
    listed = llm.client.models.list().data
    retrieved = llm.client.models.retrieve(llm.model)
    assert retrieved.id == llm.model and retrieved.created == listed[0].created > 1_600_000_000
    with pytest.raises(openai.NotFoundError) as missing:
        llm.client.models.retrieve("gpt-9")
    assert isinstance(missing.value.body, dict) and missing.value.body["code"] == "model_not_found"


def test_a_completion_reads_the_prompt_as_raw_text(llm: Served) -> None:
    prompt = "The capital of France is"
    tokens = llm.app.state.parts.engine.vocabulary.raw(prompt)
    done = llm.client.completions.create(model=llm.model, prompt=prompt, max_tokens=6, temperature=0)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    (choice,) = done.choices
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert done.usage is not None and done.usage.prompt_tokens == len(tokens)
    again = llm.client.completions.create(model=llm.model, prompt=tokens, max_tokens=6, temperature=0)
    assert again.choices[0].text == choice.text  # token ids read as the text they spell
    echoed = llm.client.completions.create(model=llm.model, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + choice.text


def test_a_completion_streamed_several_prompts_and_legacy_logprobs(llm: Served) -> None:
    prompts = ["One, two, three,", "Monday, Tuesday,"]
    whole = llm.client.completions.create(model=llm.model, prompt=prompts, max_tokens=5, temperature=0, logprobs=2)
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:
        shown: Any = choice.logprobs
        assert "".join(shown.tokens) == choice.text
        assert shown.text_offset[0] == 0 and all(len(t) <= 2 for t in shown.top_logprobs)
        assert all(lp <= 0 for lp in shown.token_logprobs)
    options: dict[str, Any] = {"max_tokens": 5, "temperature": 0, "stream_options": {"include_usage": True}}
    stream = llm.client.completions.create(model=llm.model, prompt=prompts, stream=True, **options)
    texts = ["", ""]
    finished = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert texts == [c.text for c in whole.choices]  # greedy: the same as whole
    assert set(finished) == {0, 1}
    assert usage is not None and whole.usage is not None and usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"suffix": "end"}, None),
        ({"best_of": 2}, "best_of"),
        ({"echo": True, "logprobs": 1}, None),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a"] * 9}, "prompt"),
        ({"prompt": [10_000_000]}, "prompt"),
        ({"max_tokens": 5000}, "max_tokens"),
    ],
)
def test_a_completion_that_cannot_be_honoured_is_400(llm: Served, options: dict[str, Any], param: str | None) -> None:
    body: dict[str, Any] = {"model": llm.model, "prompt": "Hi", "max_tokens": 2} | options
    with pytest.raises(openai.BadRequestError) as refused:
        llm.client.completions.create(**body)
    assert isinstance(refused.value.body, dict) and refused.value.body["type"] == "invalid_request_error"
    if param is not None:
        assert refused.value.body["param"] == param
