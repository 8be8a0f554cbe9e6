"""OpenAI tool calling on models whose chat templates know no tools (Gemma 3, SmolLM2).

The fallback format, the same for every model this service loads:
- the tools are described in a system message: each one's name, description and
  parameters (its JSON schema), and how to call them: answer with only
  ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``;
- an assistant message that called tools is rendered as that same JSON, so the model
  sees its own calls the way it is asked to make them;
- a tool's result (``role: "tool"``) becomes a user turn that names the call it
  answers, as ``name(arguments)``.

The output is constrained by a llama.cpp grammar built from the tools' schemas: with
``required`` or a named tool it must be a call, whose arguments match that tool's
schema; with ``auto`` it is either text that does not start with ``{`` or such a call;
with ``none`` the tools are left out and the text is free.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from services.llm.engine import into_system
from services.llm.engine.grammar import GrammarLimits, GrammarRefused, check_schema
from services.llm.tools.schema_grammar import Unenforceable, gbnf, rebased

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_PARALLEL = 8
"""Calls one answer may make when parallel calls are allowed."""
INSTRUCTION = (
    "You can call these tools. To call tools, answer with only a JSON object: "
    '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}. '
    "Otherwise answer in plain text."
)


class BadTool(ValueError):
    """A tool definition or choice this service cannot use; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def describe(self) -> str:
        return f"- {self.name}: {self.description or '(no description)'}\n  parameters: {json.dumps(self.parameters)}"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """The arguments as JSON text, as OpenAI sends them."""

    def public(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def parse_tools(raw: list[dict[str, Any]], limits: GrammarLimits | None = None) -> list[Tool]:
    """The request's ``tools``, checked: a 400 (BadTool) names the tool and the field.
    Each tool's parameters are held to the grammar limits before they are converted."""
    limits = limits or GrammarLimits()
    tools: list[Tool] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        where = f"tools[{index}]"
        if entry.get("type") != "function" or not isinstance(entry.get("function"), dict):
            raise BadTool(f'{where}: only tools of type "function", with a "function" object, are supported', where)
        function = entry["function"]
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise BadTool(
                f"{where}.function.name: {name!r} is not a tool name (1 to 64 of a-z, A-Z, 0-9, _ and -)",
                f"{where}.function.name",
            )
        if name in seen:
            raise BadTool(f"{where}.function.name: tool {name!r} is defined twice", f"{where}.function.name")
        seen.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise BadTool(f"tool {name!r}: description must be a string", f"{where}.function.description")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise BadTool(
                f"tool {name!r}: parameters must be a JSON schema of an object", f"{where}.function.parameters"
            )
        try:
            check_schema(parameters, limits, f"{where}.function.parameters")
            gbnf(parameters)
        except GrammarRefused as exc:
            raise BadTool(f"tool {name!r}: {exc}", exc.param or f"{where}.function.parameters") from None
        except Unenforceable as exc:
            field = f"{where}.function.parameters{exc.where}"
            raise BadTool(f"tool {name!r}: parameters{exc.where}: {exc}", field) from None
        except Exception as exc:  # the converter raises anything from KeyError to RecursionError
            raise BadTool(
                f"tool {name!r}: its parameters schema cannot constrain the output ({type(exc).__name__})",
                f"{where}.function.parameters",
            ) from None
        tools.append(Tool(name, description, parameters))
    return tools


def chosen(tools: list[Tool], choice: str | dict[str, Any] | None) -> tuple[str, list[Tool]]:
    """(mode, the tools the answer may call): mode is ``none``, ``auto`` or ``required``."""
    if choice is None:
        return ("auto", tools) if tools else ("none", [])
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise BadTool(f"tool_choice: {choice!r} is not none, auto, required or a named function", "tool_choice")
        if choice != "none" and not tools:
            raise BadTool(f"tool_choice: {choice!r} needs tools", "tool_choice")
        return (choice, tools if choice != "none" else [])
    function = choice.get("function") if choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    named = [t for t in tools if t.name == name]
    if not named:
        raise BadTool(f"tool_choice: names a function that is not among the tools ({name!r})", "tool_choice")
    return ("required", named)


def calls_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of an answer that calls tools. Each tool's parameters are a
    definition of their own, so that their ``$defs`` and ``$ref`` keep their meaning."""
    definitions = {f"tool{i}": rebased(t.parameters, f"#/$defs/tool{i}") for i, t in enumerate(tools)}
    one = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
            "required": ["name", "arguments"],
        }
        for i, t in enumerate(tools)
    ]
    return {
        "$defs": definitions,
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "items": {"anyOf": one},
                "minItems": 1,
                "maxItems": MAX_PARALLEL if parallel else 1,
            }
        },
        "required": ["tool_calls"],
    }


def grammar(mode: str, tools: list[Tool], parallel: bool) -> str | None:
    """GBNF for the answer: None for free text."""
    if mode == "none" or not tools:
        return None
    calls = gbnf(calls_schema(tools, parallel))
    if mode == "required":
        return calls
    # auto: the calls' grammar under another name, beside text that cannot start a call.
    renamed = re.sub(r"^root ::=", "calls ::=", calls, count=1, flags=re.MULTILINE)
    return renamed + "\nroot ::= calls | free-text\nfree-text ::= [^{ \\t\\n] [^\\x00]*\n"


def system_text(tools: list[Tool]) -> str:
    return INSTRUCTION + "\nTools:\n" + "\n".join(t.describe() for t in tools)


def with_tools(messages: list[dict[str, str]], tools: list[Tool]) -> list[dict[str, str]]:
    """The tools' description in the first system message (made if there is none)."""
    if not tools:
        return messages
    return into_system(messages, system_text(tools))


def rendered_calls(calls: list[dict[str, Any]]) -> str:
    """An assistant message's ``tool_calls`` as the model is asked to write them."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError:
            arguments = function.get("arguments")
        out.append({"name": function.get("name"), "arguments": arguments})
    return json.dumps({"tool_calls": out})


def rendered_result(call: str | None, content: str) -> str:
    """A tool's result, as a user turn. ``call``: the call it answers, as ``name(arguments)``.

    The call's id is left out: ids are random, and a prompt that changes with them changes
    what a small model answers (SmolLM2 did: with some ids it left the result out of its answer)."""
    # The last line: small models otherwise call the same tool again instead of answering.
    return (
        f"Result of {call or 'a tool'}:\n{content}\n\n"
        "Answer with this result, in plain text, unless another tool is needed."
    )


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls an answer makes, or None when it is text (or a call cut off by max_tokens)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return None
    calls = body.get("tool_calls") if isinstance(body, dict) else None
    if not isinstance(calls, list) or not calls:
        return None
    return [
        ToolCall(f"call_{secrets.token_hex(12)}", str(c["name"]), json.dumps(c["arguments"], ensure_ascii=False))
        for c in calls
        if isinstance(c, dict) and "name" in c and "arguments" in c
    ] or None
