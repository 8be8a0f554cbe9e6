"""An answer as a Responses object, whole or as OpenAI's event stream: ``response.created``,
``response.in_progress``, the output items (a message's text deltas, or function calls
with their arguments), then ``response.completed`` (or ``response.incomplete`` when
``max_output_tokens`` cut it)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.llm.chat.answer import Answer, Done
from services.llm.responses.schemas import ResponseRequest
from services.llm.tools.calls import ToolCall, parse_calls
from shared.sse import frame


@dataclass
class Shape:
    """What every rendering of one response shares: its id, the request's echoed fields."""

    id: str
    body: ResponseRequest
    model: str
    stored: bool = True
    """Whether the response can be continued (``previous_response_id``)."""
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]], done: Done | None) -> dict[str, Any]:
        body = self.body
        incomplete = status == "incomplete"
        chosen = body.text.format if body.text is not None else None
        text_format = chosen.model_dump(by_alias=True, exclude_none=True) if chosen is not None else {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is True,
            "previous_response_id": body.previous_response_id,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [],
            "text": {"format": text_format},
            "truncation": "disabled",
            "usage": usage(done) if done is not None else None,
            "metadata": body.metadata or {},
            "store": self.stored,
            "user": body.user,
        }


def usage(done: Done) -> dict[str, Any]:
    return {
        "input_tokens": done.prompt_tokens,
        "input_tokens_details": {"cached_tokens": done.cached_tokens},
        "output_tokens": done.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def status_of(done: Done) -> str:
    return "incomplete" if done.finish_reason == "length" else "completed"


def message(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def function_call(
    call: ToolCall, item_id: str, arguments: str | None = None, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
        "status": status,
    }


def item_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(24)}"


def output(text: str, tooling: bool) -> list[dict[str, Any]]:
    """The answer's output items: its function calls, or one message."""
    calls = parse_calls(text) if tooling else None
    if calls:
        return [function_call(call, item_id("fc")) for call in calls]
    return [message(item_id("msg"), text)]


Finish = Callable[[str, Done], Awaitable[None]]


def events(shape: Shape, answer: Answer, tooling: bool, finish: Finish) -> AsyncIterator[str]:
    """OpenAI's Responses stream. With tools, an answer that opens with ``{`` is a call:
    held until it is whole, then sent as function_call items. ``finish`` runs with the
    whole text before the last event (the conversation and its link are stored)."""
    number = 0

    def event(kind: str, **data: Any) -> str:
        nonlocal number
        number += 1
        return frame({"type": kind, "sequence_number": number - 1, **data}, event=kind)

    async def run() -> AsyncIterator[str]:
        yield event("response.created", response=shape.response("in_progress", [], None))
        yield event("response.in_progress", response=shape.response("in_progress", [], None))
        pieces: list[str] = []
        undecided = tooling
        held = False
        message_id: str | None = None
        at = {"output_index": 0, "content_index": 0}
        async for piece in answer.tokens():
            pieces.append(piece)
            if undecided:
                started = "".join(pieces).lstrip()
                if not started:
                    continue
                undecided, held = False, started.startswith("{")
                piece = "".join(pieces)
            if held:
                continue
            if message_id is None:
                message_id = item_id("msg")
                yield event("response.output_item.added", output_index=0, item=message(message_id, "", "in_progress"))
                yield event("response.content_part.added", item_id=message_id, **at, part=text_part(""))
            yield event("response.output_text.delta", item_id=message_id, **at, delta=piece, logprobs=[])
        done = answer.result
        text = "".join(pieces)
        await finish(text, done)
        items: list[dict[str, Any]] = []
        calls = parse_calls(text) if (held or undecided) else None
        if calls:
            for index, call in enumerate(calls):
                call_item = item_id("fc")
                added = function_call(call, call_item, "", "in_progress")
                yield event("response.output_item.added", output_index=index, item=added)
                yield event(
                    "response.function_call_arguments.delta",
                    item_id=call_item,
                    output_index=index,
                    delta=call.arguments,
                )
                yield event(
                    "response.function_call_arguments.done",
                    item_id=call_item,
                    output_index=index,
                    name=call.name,
                    arguments=call.arguments,
                )
                items.append(function_call(call, call_item))
                yield event("response.output_item.done", output_index=index, item=items[-1])
        else:
            if message_id is None:  # nothing was sent yet: an empty answer, or a call cut short
                message_id = item_id("msg")
                yield event("response.output_item.added", output_index=0, item=message(message_id, "", "in_progress"))
                yield event("response.content_part.added", item_id=message_id, **at, part=text_part(""))
                if text:
                    yield event("response.output_text.delta", item_id=message_id, **at, delta=text, logprobs=[])
            yield event("response.output_text.done", item_id=message_id, **at, text=text, logprobs=[])
            yield event("response.content_part.done", item_id=message_id, **at, part=text_part(text))
            items.append(message(message_id, text))
            yield event("response.output_item.done", output_index=0, item=items[-1])
        status = status_of(done)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield event(kind, response=shape.response(status, items, done))

    return run()


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
