"""A Responses request as the chat request the service answers: ``input`` items as chat
messages, function tools in chat's shape, ``text.format`` as ``response_format``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from services.llm.chat.schemas import ChatCompletionRequest
from services.llm.responses.schemas import ResponseRequest, SchemaFormat, TextOptions
from shared.errors import BadRequest

TEXT_PARTS = ("input_text", "output_text", "text")
"""Content parts read as text; any other part (images, files, audio) is refused."""
ROLES = ("user", "assistant", "system", "developer")


def refused(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="unsupported_value")


def text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("content is text or a list of text parts", param=where)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            message = f"content parts of type {kind!r} are not supported: the model reads text"
            raise refused(message, f"{where}[{index}]")
        texts.append(part["text"])
    return "".join(texts)


def messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as chat messages: function calls join the assistant message before them."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    made: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise BadRequest(f"role is one of {', '.join(ROLES)}", param=f"{where}.role")
            made.append({"role": role, "content": text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id", "")),
                "type": "function",
                "function": {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", ""))},
            }
            if made and made[-1]["role"] == "assistant" and made[-1].get("tool_calls") is not None:
                made[-1]["tool_calls"].append(call)
            else:
                made.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output)
            made.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text})
        else:
            raise refused(f"input items of type {kind!r} are not supported by this service", f"{where}.type")
    return made


def tools(value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools in chat's shape; a built-in tool (web or file search, ...) is a 400."""
    if value is None:
        return None
    made = []
    for index, tool in enumerate(value):
        kind = tool.get("type")
        if kind != "function":
            raise refused(f"the built-in tool {kind!r} is not supported: only function tools", f"tools[{index}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        made.append({"type": "function", "function": function})
    return made


def tool_choice(value: str | dict[str, Any] | None) -> Any:
    if value is None or isinstance(value, str):
        return value
    if value.get("type") != "function":
        raise refused(f"tool_choice of type {value.get('type')!r} is not supported", "tool_choice")
    return {"type": "function", "function": {"name": value.get("name")}}


def response_format(text: TextOptions | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None:
        return None
    if isinstance(fmt, SchemaFormat):
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt.type}


def chat_request(body: ResponseRequest, conversation: str | None) -> ChatCompletionRequest:
    """The chat request that answers ``body`` (its bounds and checks are chat's)."""
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    raw: dict[str, Any] = {
        "model": body.model,
        "messages": instructions + messages(body.input),
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tools": tools(body.tools),
        "tool_choice": tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": response_format(body.text),
        "conversation": conversation,
    }
    try:
        return ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}", param=renamed(where)) from None


CHAT_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text"}
"""Chat's field names as the Responses request calls them."""


def renamed(param: str | None) -> str | None:
    """A chat field named in an error, as the Responses request calls it."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    return CHAT_NAMES.get(head, head) + dot + rest
