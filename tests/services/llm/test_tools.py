"""Tool calling: definitions checked, calls and results rendered, arguments that always
match their schema, through the official OpenAI SDK (plain and streamed)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from llama_cpp import llama_grammar
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from services.llm.schemas import ChatMessage, prompt_messages
from services.llm.tools import BadTool, chosen, grammar, parse_calls, parse_tools
from tests.services.llm.conftest import Llm

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city"],
        },
    },
}
ADD: Any = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}
ADD_ONLY: Any = {"type": "function", "function": {"name": "add"}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}


def function(name: str, **fields: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **fields}}


@pytest.mark.parametrize(
    ("tools", "choice", "param", "words"),
    [
        ([function("bad name!")], None, "tools[0].function.name", "'bad name!'"),
        ([function("x" * 65)], None, "tools[0].function.name", "xxxx"),
        ([WEATHER, function("get_weather")], None, "tools[1].function.name", "defined twice"),
        (
            [function("f", parameters={"type": "object", "properties": {"a": {"$ref": "#/definitions/none"}}})],
            None,
            "tools[0].function.parameters",
            "tool 'f'",
        ),
        ([function("f", parameters={"type": "string"})], None, "tools[0].function.parameters", "tool 'f'"),
        ([{"type": "retrieval"}], None, "tools[0]", "function"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "'nope'"),
        ([], "required", "tool_choice", "needs tools"),
    ],
)
def test_bad_tool_definitions_name_the_tool_and_the_field(
    tools: list[dict[str, Any]], choice: Any, param: str, words: str
) -> None:
    with pytest.raises(BadTool) as raised:
        chosen(parse_tools(tools), choice)
    assert raised.value.param == param
    assert words in str(raised.value)


def test_choices_and_their_grammars() -> None:
    tools = parse_tools([WEATHER, ADD])
    assert chosen(tools, None) == ("auto", tools)
    assert chosen(tools, "none") == ("none", [])
    assert chosen([], None) == ("none", [])
    assert chosen(tools, {"type": "function", "function": {"name": "add"}}) == ("required", [tools[1]])
    assert grammar("none", tools, True) is None
    for mode in ("auto", "required"):  # llama.cpp parses both
        llama_grammar.LlamaGrammar.from_string(grammar(mode, tools, True) or "", verbose=False)
    assert "free-text" in (grammar("auto", tools, False) or "")
    assert "free-text" not in (grammar("required", tools, False) or "")


def test_calls_and_results_are_rendered_into_the_prompt() -> None:
    messages = [
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            }
        ),
        ChatMessage(role="tool", tool_call_id="call_1", content="Sunny, 21 C"),
    ]
    rendered = prompt_messages(messages)
    assert [m["role"] for m in rendered] == ["user", "assistant", "user"]
    assert json.loads(rendered[1]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    }
    assert rendered[2]["content"].startswith("Result of the tool get_weather (call call_1):\nSunny, 21 C\n")


def test_answers_that_are_not_whole_calls_are_text() -> None:
    assert parse_calls("It is sunny.") is None
    assert parse_calls('{"tool_calls": [{"name": "add", "arguments": {"a": 1') is None  # cut off by max_tokens
    calls = parse_calls('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}')
    assert calls is not None and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert calls[0].id.startswith("call_")


def functions(calls: list[Any] | None) -> list[Any]:
    """The function calls among an SDK message's tool calls."""
    return [c for c in calls or [] if isinstance(c, ChatCompletionMessageFunctionToolCall)]


def valid(name: str, arguments: str) -> bool:
    try:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    except (jsonschema.ValidationError, json.JSONDecodeError, KeyError):
        return False
    return True


@pytest.mark.slow
def test_the_openai_sdk_gets_calls_whose_arguments_match_their_schema(llm: Llm) -> None:
    client = openai.OpenAI(base_url=f"{llm.url}/v1", api_key=llm.token)
    asked: list[Any] = [{"role": "user", "content": "What is the weather in Oslo for the next 3 days?"}]
    answer = client.chat.completions.create(
        model=llm.model, messages=asked, tools=[WEATHER, ADD], tool_choice="required", max_tokens=80, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    calls = functions(choice.message.tool_calls)
    assert calls and all(valid(c.function.name, c.function.arguments) for c in calls)

    # Named: that tool and no other.
    named = client.chat.completions.create(
        model=llm.model,
        messages=[{"role": "user", "content": "What is 2 plus 40?"}],
        tools=[WEATHER, ADD],
        tool_choice=ADD_ONLY,
        max_tokens=60,
        temperature=0,
    )
    named_calls = functions(named.choices[0].message.tool_calls)
    assert [c.function.name for c in named_calls] == ["add"] and valid("add", named_calls[0].function.arguments)

    # The call's result fed back: a plain answer.
    call = calls[0]
    history: list[Any] = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C, light wind."},
    ]
    followed = client.chat.completions.create(
        model=llm.model,
        messages=history,
        tools=[WEATHER, ADD],
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    assert followed.choices[0].finish_reason in ("stop", "length")
    assert (followed.choices[0].message.content or "").strip()
    assert not followed.choices[0].message.tool_calls


@pytest.mark.slow
def test_streamed_calls_are_assembled_by_the_sdks_stream_helper(llm: Llm) -> None:
    client = openai.OpenAI(base_url=f"{llm.url}/v1", api_key=llm.token)
    with client.chat.completions.stream(
        model=llm.model,
        messages=[{"role": "user", "content": "Add 19 and 23."}],
        tools=[WEATHER, ADD],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert any(e.type == "tool_calls.function.arguments.done" for e in events)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = functions(choice.message.tool_calls)
    assert calls and all(valid(c.function.name, c.function.arguments) for c in calls)

    # auto: text or calls, and any call valid.
    for question in ("Say hello.", "What is the weather in Lima?"):
        answer = client.chat.completions.create(
            model=llm.model,
            messages=[{"role": "user", "content": question}],
            tools=[WEATHER, ADD],
            max_tokens=60,
            temperature=0,
        )
        message = answer.choices[0].message
        if message.tool_calls:
            assert answer.choices[0].finish_reason == "tool_calls"
            assert all(valid(c.function.name, c.function.arguments) for c in functions(message.tool_calls))
        else:
            assert (message.content or "").strip()


@pytest.mark.slow
def test_bad_tools_are_400_before_any_work(llm: Llm) -> None:
    body = {
        "model": llm.model,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER, function("get_weather")],
    }
    response = llm.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools[1].function.name" and error["code"] == "invalid_tool"
    assert "get_weather" in error["message"]
    assert response.elapsed.total_seconds() < 2


def weather_tool() -> Any:
    def get_weather(city: str) -> str:
        """The weather forecast for a city."""
        return f"Sunny, 21 C in {city}."

    return get_weather


@pytest.mark.slow
def test_langchain_binds_tools_and_gets_structured_output(llm: Llm) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, SecretStr

    class Person(BaseModel):
        """A person mentioned in the text."""

        name: str
        age: int

    model = ChatOpenAI(
        base_url=f"{llm.url}/v1", api_key=SecretStr(llm.token), model=llm.model, temperature=0, max_completion_tokens=60
    )
    message = model.bind_tools([weather_tool()], tool_choice="required").invoke("What is the weather in Oslo?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"].get("city"), str)

    person = model.with_structured_output(Person, method="function_calling").invoke("Ada is 36 years old.")
    assert isinstance(person, Person)  # was None before tool calling: no error, no answer
