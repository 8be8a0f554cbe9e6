"""The Responses request, as far as this service serves it; what it does not do is a 400
that names the field, never ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.llm.schemas import NULL_IS_THE_DEFAULT, null_is_the_default
from shared.wire import Boolean, Number, PositiveInteger

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
    )
    instructions: str | None = Field(default=None, description="A system message for this turn only")
    max_output_tokens: PositiveInteger | None = None
    temperature: Number = Field(default=0.8, ge=0, le=2, json_schema_extra=null_is_the_default)
    top_p: Number = Field(default=0.95, gt=0, le=1, json_schema_extra=null_is_the_default)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: Boolean | None = None
    stream: Boolean = Field(default=False, json_schema_extra=null_is_the_default)
    previous_response_id: str | None = Field(default=None, max_length=64)
    store: Boolean | None = Field(default=None, description="Default true: the response may be continued")
    text: dict[str, Any] | None = Field(default=None, description='{"format": {"type": "text" | "json_object" | '
                                        '"json_schema", "name", "schema", "strict"}}')  # fmt: skip
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    truncation: Literal["auto", "disabled"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in NULL_IS_THE_DEFAULT)}
            for name, why in UNSUPPORTED.items():
                if data.get(name) not in (None, {}, False):
                    raise ValueError(why)
        return data
