"""OpenAI's chat schema (the parts this service serves), plus the seed's /chat shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from services.llm.tools.calls import MAX_PARALLEL, NAME, rendered_calls, rendered_result
from shared.protocol.rag import QueryFilter
from shared.wire import Boolean, Fraction, Integer, Number, PositiveInteger, TopK


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(max_length=64)
    arguments: str = Field(description="The arguments as JSON text")


class ToolCallIn(BaseModel):
    """A call an earlier assistant message made, sent back with the conversation."""

    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=MAX_PARALLEL)
    """An assistant message's calls."""
    tool_call_id: str | None = Field(default=None, max_length=128)
    """A tool message: the call it answers."""

    @model_validator(mode="after")
    def _utf8(self) -> ChatMessage:
        try:
            self.text().encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("content must be valid UTF-8 text (it holds a lone surrogate)") from None
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def plain(self) -> dict[str, str]:
        """For the chat template: developer speaks as system, content as one string."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


def prompt_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them: assistant calls and tool results in
    the fallback format of services.llm.tools.calls."""
    calls_by_id: dict[str, str] = {}
    out = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            calls = [c.model_dump() for c in message.tool_calls]
            calls_by_id |= {c.id: f"{c.function.name}({c.function.arguments})" for c in message.tool_calls}
            text = "\n".join(filter(None, [message.text(), rendered_calls(calls)]))
            out.append({"role": "assistant", "content": text})
        elif message.role == "tool":
            call = calls_by_id.get(message.tool_call_id or "") or message.name
            out.append({"role": "user", "content": rendered_result(call, message.text())})
        else:
            out.append(message.plain())
    return out


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Boolean | None = None
    description: str | None = None


class PlainFormat(BaseModel):
    type: Literal["text", "json_object"]


class SchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[PlainFormat | SchemaFormat, Field(discriminator="type")]
"""A json_schema format needs its schema: the document says so, not only a validator."""


class StreamOptions(BaseModel):
    include_usage: Boolean = False


class RagOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: TopK | None = None
    filter: QueryFilter | None = None
    recency_bias: Fraction | None = None


def at_most_four_stops(schema: dict[str, Any]) -> None:
    """The document states the validator's bound (a list of at most 4)."""
    for branch in schema.get("anyOf", ()):
        if branch.get("type") == "array":
            branch["maxItems"] = 4


TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": NAME.pattern},
                "description": {"type": "string"},
                "parameters": {"type": "object", "description": "A JSON schema of an object"},
            },
        },
    },
}
"""What the service checks itself (services.llm.tools.calls.parse_tools), so that its 400 names the tool."""


class FunctionName(BaseModel):
    name: str


class ToolChoiceFunction(BaseModel):
    type: Literal["function"]
    function: FunctionName


def checked_biases(value: dict[str, float] | None) -> dict[str, float] | None:
    """``logit_bias``: token ids (as strings) to a bias from -100 to 100."""
    for token, bias in (value or {}).items():
        if not token.isdigit() or len(token) > 9:
            raise ValueError(f"logit_bias keys are token ids, not {token[:20]!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias values are from -100 to 100, not {bias}")
    return value


def token_biases_in_schema(schema: dict[str, Any]) -> None:
    """The document states what ``checked_biases`` holds the map to."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "object":
            branch["propertyNames"] = {"pattern": "^[0-9]{1,9}$"}
            branch["additionalProperties"] = {"type": "number", "minimum": -100, "maximum": 100}


def nulls_and_refusals(data: Any, unsupported: dict[str, str]) -> Any:
    """A request body before validation: a null that means the default left out, and a
    field this service does not do (``unsupported``: its reason) refused, never ignored.
    An empty value of such a field (``{}``, ``false``) asks for nothing and passes."""
    if not isinstance(data, dict):
        return data
    data = {k: v for k, v in data.items() if not (v is None and k in NULL_IS_THE_DEFAULT)}
    for name, why in unsupported.items():
        if data.get(name) not in (None, {}, False):
            raise ValueError(why)
    return data


def checked_stops(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and len(value) > 4:
        raise ValueError("at most 4 stop sequences")
    return value


def stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def null_is_the_default(schema: dict[str, Any]) -> None:
    """The document says what OpenAI's does: null is allowed here, and means the default."""
    keep = ("default", "description", "title")
    branch = {k: schema.pop(k) for k in list(schema) if k not in keep}
    schema["anyOf"] = [branch, {"type": "null"}]


NULL_IS_THE_DEFAULT = ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty")
"""Fields OpenAI's schema calls nullable that have a default here: null means that default."""
MAX_LOGIT_BIAS = 300
"""Token biases one request may give (OpenAI's own bound)."""
MAX_CHOICES = 8
"""``n``: choices one request may ask for (each is a sequence in the batch, the prompt read once)."""
UNSUPPORTED = {
    "functions": "the deprecated functions field is not supported: send tools",
    "function_call": "the deprecated function_call field is not supported: send tool_choice",
    "audio": "audio output is not supported by this service",
    "prediction": "predicted outputs are not supported by this service",
    "web_search_options": "web search is not supported by this service",
}
"""Fields that would change the answer and that this service does not do: a 400, never ignored."""


class ChatCompletionRequest(BaseModel):
    """Unknown fields are ignored, as OpenAI's API does for fields it does not use; the
    fields that would change the answer and that this service does not do are refused
    (``UNSUPPORTED``)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInteger | None = None
    max_completion_tokens: PositiveInteger | None = None
    temperature: Number = Field(default=0.8, ge=0, le=2, json_schema_extra=null_is_the_default)
    top_p: Number = Field(default=0.95, gt=0, le=1, json_schema_extra=null_is_the_default)
    stop: str | list[str] | None = Field(default=None, json_schema_extra=at_most_four_stops)
    seed: Integer | None = None
    stream: Boolean = Field(default=False, json_schema_extra=null_is_the_default)
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: Number = Field(default=0.0, ge=-2, le=2, json_schema_extra=null_is_the_default)
    frequency_penalty: Number = Field(default=0.0, ge=-2, le=2, json_schema_extra=null_is_the_default)
    n: Integer = Field(default=1, ge=1, le=MAX_CHOICES, json_schema_extra=null_is_the_default)
    logit_bias: dict[str, Number] | None = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS,
        json_schema_extra=token_biases_in_schema,
        description="Token id (as a string) to a bias from -100 to 100, added to the token's logit",
    )
    logprobs: Boolean | None = None
    top_logprobs: Integer | None = Field(default=None, ge=0, le=20)
    rag: RagOptions | None = None
    conversation: str | None = Field(
        default=None,
        max_length=64,
        description="A stored conversation (POST /v1/conversations) this turn continues: its history goes "
        "in front of messages, and the turn and the answer are appended to it",
    )
    route: str | None = Field(
        default=None,
        max_length=64,
        description="A routing hint (e.g. complex) matched against the hint rules of GEMMA_BACKENDS_FILE",
    )
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=128,
        json_schema_extra={"items": cast(JsonValue, TOOL_SCHEMA)},
        description='[{"type": "function", "function": {"name", "description", "parameters"}}]; '
        "each one is checked (a 400 names the tool and the field)",
    )
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: Boolean | None = None
    user: str | None = Field(default=None, max_length=256, description="Accepted; the caller is the token's subject")

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data: Any) -> Any:
        return nulls_and_refusals(data, UNSUPPORTED)

    @model_validator(mode="after")
    def _logprobs_asked(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    _biases = field_validator("logit_bias")(checked_biases)

    def token_biases(self) -> dict[int, float]:
        return {int(token): float(bias) for token, bias in (self.logit_bias or {}).items()}

    _few_stops = field_validator("stop")(checked_stops)

    def stops(self) -> list[str]:
        return stop_list(self.stop)


class SeedChatRequest(BaseModel):
    """The seed's own /chat and /chat/stream body."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInteger | None = None
    temperature: Number = Field(default=0.7, ge=0, le=2)
    context: list[str] = Field(default_factory=list, max_length=50)
    use_rag: Boolean = True
    rag_top_k: Integer = Field(default=5, ge=1, le=50)
    conversation_id: str | None = Field(default=None, max_length=64)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    summarized_messages: int | None = Field(
        default=None, description="In a conversation: its messages the prompt carried as a summary"
    )


class SeedChatResponse(BaseModel):
    response: str
    model: str
    usage: Usage
    rag_context_used: int
    sources: list[dict[str, Any]]
    gpu_wait_time: float
    inference_time: float


# --- what the chat routes answer -------------------------------------------------------


class BatonExtras(BaseModel):
    """Baton's own facts about an answer, beside OpenAI's fields."""

    device: str = Field(description="Where the answer was computed: gpu, cpu, or backend:<name> (a remote backend)")
    gpu_wait_time: float = Field(description="Seconds spent waiting for the GPU")
    inference_time: float = Field(description="Seconds from the first token asked to the last made")
    rag_context_used: int = Field(description="Memories put into the prompt")
    warnings: list[str]


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(default=None, description="Present when the answer calls tools")


class ToolCallDelta(ToolCallOut):
    index: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI's ``logprobs`` of a choice: one entry per generated token."""

    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


def logprobs_out(entries: list[Any]) -> dict[str, Any]:
    """Engine ``TokenLogprob`` entries in OpenAI's shape (``choice.logprobs``)."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": c.token, "logprob": c.logprob, "bytes": c.bytes} for c in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    """OpenAI's chat completion, with the memories used (``sources``) and ``baton``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    sources: list[dict[str, Any]] = Field(description="The memories the answer drew on")
    baton: BatonExtras


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion (the ``data`` of each server-sent event,
    until ``[DONE]``). The last chunk with a choice carries ``sources`` and ``baton``; with
    ``stream_options.include_usage`` one more chunk, without choices, carries ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    sources: list[dict[str, Any]] | None = None
    baton: BatonExtras | None = None


class SeedChatChunk(BaseModel):
    """One event of ``POST /chat/stream``: a token, then a last event with ``done`` true."""

    token: str
    done: bool
    usage: Usage | None = None
    sources: list[dict[str, Any]] | None = None
    rag_context_used: int | None = None
    gpu_wait_time: float | None = None
    inference_time: float | None = None


# --- conversations -----------------------------------------------------------------------


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(default="", max_length=200)


class ConversationCard(BaseModel):
    id: str
    title: str
    created_at: float


class ConversationList(BaseModel):
    data: list[ConversationCard] = Field(description="The caller's own, newest first")


class StoredMessage(BaseModel):
    role: str
    content: str
    created_at: float


class ConversationView(ConversationCard):
    messages: list[StoredMessage]
    summary: str | None = Field(description="The model's summary of the oldest messages, once they no longer fit")
    summarized_messages: int
