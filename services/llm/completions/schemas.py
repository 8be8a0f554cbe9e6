"""OpenAI's legacy completion request and answer (the parts this service serves)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from services.llm.chat.schemas import (
    MAX_LOGIT_BIAS,
    StreamOptions,
    Usage,
    at_most_four_stops,
    checked_biases,
    checked_stops,
    null_is_the_default,
    nulls_and_refusals,
    stop_list,
    token_biases_in_schema,
)
from shared.wire import Boolean, Integer, Number, PositiveInteger

MAX_PROMPTS = 8
"""Choices one request may ask for, prompts times ``n`` (each is a sequence in the batch)."""
MAX_LOGPROBS = 5
"""OpenAI's bound on the legacy ``logprobs``."""
DEFAULT_MAX_TOKENS = 16
"""OpenAI's legacy default."""

Prompt = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(BaseModel):
    """Unknown fields are ignored, as OpenAI's API does; ``suffix`` and ``best_of`` above
    1 would change the answer and are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: Prompt = Field(description="Text, texts, or the model's own token ids (one list, or a list of lists)")
    max_tokens: PositiveInteger | None = Field(default=None, description=f"Default {DEFAULT_MAX_TOKENS}")
    temperature: Number = Field(default=0.8, ge=0, le=2, json_schema_extra=null_is_the_default)
    top_p: Number = Field(default=0.95, gt=0, le=1, json_schema_extra=null_is_the_default)
    n: Integer = Field(default=1, ge=1, le=MAX_PROMPTS, json_schema_extra=null_is_the_default)
    stream: Boolean = Field(default=False, json_schema_extra=null_is_the_default)
    stream_options: StreamOptions | None = None
    logprobs: Integer | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Boolean | None = None
    stop: str | list[str] | None = Field(default=None, json_schema_extra=at_most_four_stops)
    presence_penalty: Number = Field(default=0.0, ge=-2, le=2, json_schema_extra=null_is_the_default)
    frequency_penalty: Number = Field(default=0.0, ge=-2, le=2, json_schema_extra=null_is_the_default)
    best_of: Integer | None = Field(default=None, ge=1, le=1, description="Only 1 (the default)")
    logit_bias: dict[str, Number] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, json_schema_extra=token_biases_in_schema
    )
    seed: Integer | None = None
    suffix: None = Field(default=None, description="Not supported (fill-in-the-middle): a non-null value is 400")
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data: Any) -> Any:
        return nulls_and_refusals(data, {"suffix": "suffix (fill-in-the-middle) is not supported by this service"})

    @model_validator(mode="after")
    def _echo_without_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported: the prompt's log-probabilities are not computed")
        return self

    _few_stops = field_validator("stop")(checked_stops)
    _biases = field_validator("logit_bias")(checked_biases)

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, one per choice: texts, or token-id lists."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(item, int) for item in value):
            return [[int(item) for item in value if isinstance(item, int)]]
        return value  # type: ignore[return-value]

    def stops(self) -> list[str]:
        return stop_list(self.stop)


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    """OpenAI's text completion (the answer, or with ``stream`` each event's ``data``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
