"""The Responses request, as far as this service serves it; what it does not do is a 400
that names the field, never ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.llm.chat.schemas import null_is_the_default, nulls_and_refusals
from services.llm.tools.calls import NAME
from shared.wire import Boolean, Number, PositiveInteger

TEXT_PART: dict[str, Any] = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": {"type": "string"}},
}
INPUT_ITEM: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "type": {"enum": ["message"]},
                "role": {"enum": ["user", "assistant", "system", "developer"]},
                "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]},
            },
        },
        {
            "type": "object",
            "required": ["type", "call_id", "name", "arguments"],
            "properties": {
                "type": {"enum": ["function_call"]},
                "call_id": {"type": "string"},
                "name": {"type": "string"},
                "arguments": {"type": "string", "description": "JSON text"},
            },
        },
        {
            "type": "object",
            "required": ["type", "call_id", "output"],
            "properties": {
                "type": {"enum": ["function_call_output"]},
                "call_id": {"type": "string"},
                "output": {"type": "string"},
            },
        },
    ]
}
"""The input items this service reads (checked in translate.py, where a 400 names the item)."""
FUNCTION_TOOL: dict[str, Any] = {
    "type": "object",
    "required": ["type", "name"],
    "properties": {
        "type": {"enum": ["function"]},
        "name": {"type": "string", "pattern": NAME.pattern},
        "description": {"type": "string"},
        "parameters": {"type": "object", "description": "A JSON schema of an object"},
        "strict": {"type": "boolean"},
    },
}
TOOL_CHOICE: dict[str, Any] = {
    "anyOf": [
        {"enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "required": ["type", "name"],
            "properties": {"type": {"enum": ["function"]}, "name": {"type": "string"}},
        },
        {"type": "null"},
    ]
}


class PlainFormat(BaseModel):
    type: Literal["text", "json_object"]


class SchemaFormat(BaseModel):
    type: Literal["json_schema"]
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Boolean | None = None
    description: str | None = None


class TextOptions(BaseModel):
    format: Annotated[PlainFormat | SchemaFormat, Field(discriminator="type")] | None = None


def _items(item: dict[str, Any]) -> Any:
    """The document states what each list holds (what the code checks itself, so that
    its 400 names the item)."""

    def refine(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "array":
                branch["items"] = item

    return refine


def _replaced(replacement: dict[str, Any]) -> Any:
    def refine(schema: dict[str, Any]) -> None:
        keep = {k: schema[k] for k in ("default", "description", "title") if k in schema}
        schema.clear()
        schema.update(keep | replacement)

    return refine


UNSUPPORTED = {
    "background": "background responses are not supported by this service",
    "conversation": "the conversation field is not supported: continue with previous_response_id",
    "prompt": "stored prompt templates are not supported by this service",
    "reasoning": "reasoning options are not supported: the model does not reason apart from its answer",
}
"""Fields that would change the answer and that this service does not do."""


class ResponseRequest(BaseModel):
    """Unknown fields are ignored, as OpenAI's API does for fields it does not use."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[dict[str, Any]] = Field(
        description="Text, or items: messages (input_text and output_text parts), function_call and "
        "function_call_output",
        max_length=1000,
        json_schema_extra=_items(INPUT_ITEM),
    )
    instructions: str | None = Field(default=None, description="A system message for this turn only")
    max_output_tokens: PositiveInteger | None = None
    temperature: Number = Field(default=0.8, ge=0, le=2, json_schema_extra=null_is_the_default)
    top_p: Number = Field(default=0.95, gt=0, le=1, json_schema_extra=null_is_the_default)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128, json_schema_extra=_items(FUNCTION_TOOL))
    tool_choice: str | dict[str, Any] | None = Field(default=None, json_schema_extra=_replaced(TOOL_CHOICE))
    parallel_tool_calls: Boolean | None = None
    stream: Boolean = Field(default=False, json_schema_extra=null_is_the_default)
    previous_response_id: str | None = Field(default=None, max_length=64)
    store: Boolean | None = Field(default=None, description="Default true: the response may be continued")
    text: TextOptions | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    truncation: Literal["auto", "disabled"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data: Any) -> Any:
        return nulls_and_refusals(data, UNSUPPORTED)


class ResponseObject(BaseModel):
    """OpenAI's response object (the fields every answer has; the request's are echoed)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


class ResponseEvent(BaseModel):
    """One event of a streamed response (``response.created`` ... ``response.completed``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int
