"""llama.cpp behind one small class: load with N GPU layers, format chats, stream tokens.

Everything here blocks and is meant for a worker thread; the caller makes sure one
request uses the model at a time. "Offloading" is a reload with 0 GPU layers: a
llama.cpp model cannot move its layers once loaded.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import llama_cpp
from llama_cpp import llama_grammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.llm.engine.grammar import GrammarGuard, GrammarLimits, GrammarRefused, check_schema, route_llama_logs
from services.llm.prefixes import PrefixStates
from services.llm.schema_grammar import Unenforceable, gbnf

log = logging.getLogger(__name__)

Message = dict[str, str]


def into_system(messages: Sequence[Message], text: str) -> list[Message]:
    """``text`` appended to the first system message, or one made for it: every chat
    template accepts a system message there."""
    out = list(messages)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def longest_piece(vocab: Any) -> int:
    """The most characters one token of ``vocab`` spells (81 for SmolLM2, 31 for Gemma 3)."""
    buffer = ctypes.create_string_buffer(1024)
    longest = 1
    for token in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
        if size > 0:
            longest = max(longest, len(buffer.raw[:size].decode("utf-8", "replace")))
    return longest


def can_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU at all."""
    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    stop: list[str]


@dataclass
class Params:
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    """llama.cpp's own penalty on recent tokens (1.0: none); the service's summaries use it."""
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    grammar: str | None = None
    """GBNF that constrains the output (tool calls, services.llm.tools; text-to-SQL)."""
    grammar_param: str = "tools"
    """The request field ``grammar`` was made from, named when it is refused."""


@dataclass
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


class Cancelled(Exception):
    """The caller stopped the generation (client gone)."""


class BadSchema(ValueError):
    """A json_schema llama.cpp cannot turn into a grammar; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = "response_format") -> None:
        super().__init__(message)
        self.param = param


SCHEMA_PARAM = "response_format.json_schema.schema"


def grammar_text(params: Params, limits: GrammarLimits) -> tuple[str, str] | None:
    """(GBNF, the field it comes from) for the output's constraint, if any. BadSchema for
    a schema that has no grammar or one past the limits (checked before it is converted)."""
    if params.json_schema is not None:
        try:
            check_schema(params.json_schema, limits, SCHEMA_PARAM)
            return gbnf(params.json_schema), SCHEMA_PARAM
        except GrammarRefused as exc:
            raise BadSchema(str(exc), exc.param) from None
        except Unenforceable as exc:
            raise BadSchema(f"the json_schema{exc.where}: {exc}", f"{SCHEMA_PARAM}{exc.where}") from None
        except Exception as exc:  # the converter raises anything from KeyError to RecursionError
            raise BadSchema(
                f"the json_schema cannot be used to constrain the output ({type(exc).__name__})", SCHEMA_PARAM
            ) from None
    if params.grammar is not None:
        return params.grammar, params.grammar_param
    if params.json_object:
        return llama_grammar.JSON_GBNF, "response_format"
    return None


def grammar_for(params: Params, limits: GrammarLimits | None = None) -> llama_grammar.LlamaGrammar | None:
    """The grammar that constrains the output, if any; BadSchema for a schema that has none."""
    found = grammar_text(params, limits or GrammarLimits())
    return llama_grammar.LlamaGrammar.from_string(found[0], verbose=False) if found else None


def gemma_prompt(messages: Sequence[Message]) -> str:
    """Gemma's turn format. System text goes first into the first user turn, as
    Gemma's own template does (llama-cpp-python's ``format_gemma`` drops it)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    parts = []
    for index, message in enumerate(turns):
        role = "model" if message["role"] == "assistant" else "user"
        content = message["content"]
        if index == 0 and role == "user" and system:
            content = f"{system}\n\n{content}"
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    return "<bos>" + "".join(parts) + "<start_of_turn>model\n"


def chatml_prompt(messages: Sequence[Message]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


class Engine:
    def __init__(
        self,
        path: Path,
        *,
        context_size: int,
        batch_size: int,
        threads: int | None = None,
        chat_format: str | None = None,
        prefix_budget_bytes: int = 0,
        grammar_limits: GrammarLimits | None = None,
    ) -> None:
        route_llama_logs()
        self.path = path
        self.prefixes = PrefixStates(prefix_budget_bytes)
        self._batch_size = batch_size
        self._threads = threads
        self._lock = threading.Lock()
        # The vocabulary alone, kept for tokenizing: prompts are fitted outside the model
        # slot, even while the model itself is being reloaded.
        self._vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._vocab_lock = threading.Lock()
        self.metadata: dict[str, str] = dict(self._vocab.metadata)
        self.grammar_limits = grammar_limits or GrammarLimits()
        self.guard = GrammarGuard(self._vocab._model.vocab, self.grammar_limits)
        self.longest_piece = longest_piece(self._vocab._model.vocab)
        arch = self.metadata.get("general.architecture", "")
        trained = int(self.metadata.get(f"{arch}.context_length", context_size))
        self.n_ctx = min(context_size, trained)
        if self.n_ctx < context_size:
            log.info(
                "context capped at what the model was trained for", extra={"asked": context_size, "n_ctx": self.n_ctx}
            )
        template = None if chat_format else self.metadata.get("tokenizer.chat_template")
        self.chat_format = chat_format or ("gguf" if template else "gemma")
        self._formatter: Jinja2ChatFormatter | None = None
        if template:
            eos = self._vocab.detokenize([self._vocab.token_eos()]).decode("utf-8", "ignore")
            bos = self._vocab.detokenize([self._vocab.token_bos()]).decode("utf-8", "ignore")
            self._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        self._llama: llama_cpp.Llama | None = None
        self.gpu_layers = 0

    @property
    def max_prompt_chars(self) -> int:
        """More characters than this cannot fit the context: no token spells more than
        ``longest_piece`` of them. Text past it is refused before it is tokenized."""
        return self.n_ctx * self.longest_piece

    @property
    def llama(self) -> llama_cpp.Llama:
        if self._llama is None:
            raise RuntimeError("the model is not loaded")
        return self._llama

    @property
    def threads(self) -> int | None:
        """CPU threads llama.cpp decodes with (its own choice unless GEMMA_THREADS says)."""
        return self._llama.n_threads if self._llama is not None else self._threads

    def load(self, gpu_layers: int) -> float:
        """(Re)load with ``gpu_layers`` layers on the GPU; returns the seconds it took."""
        with self._lock:
            started = time.monotonic()
            if self._llama is not None:
                self._llama.close()
                self._llama = None
            self.prefixes.clear()  # a saved state belongs to the context it came from
            on_card = gpu_layers > 0
            self._llama = llama_cpp.Llama(
                model_path=str(self.path),
                n_gpu_layers=gpu_layers,
                # Offloaded means off the card: no KV cache there and no large batches sent
                # to it (llama.cpp's op offload), which would use the GPU without the lease
                # and keep a compute buffer of the vocabulary's logits on it.
                offload_kqv=on_card,
                op_offload=on_card,
                n_ctx=self.n_ctx,
                n_batch=self._batch_size,
                n_threads=self._threads,
                verbose=False,
            )
            self.gpu_layers = gpu_layers
            return time.monotonic() - started

    def close(self) -> None:
        with self._lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None
        self._vocab.close()

    def count(self, text: str) -> int:
        """Tokens in ``text`` alone."""
        with self._vocab_lock:
            return len(self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def prompt(self, messages: Sequence[Message]) -> Prompt:
        """The exact tokens the model will read, and the strings that end its turn."""
        if self._formatter is not None:
            formatted = self._formatter(messages=list(messages))  # type: ignore[arg-type]
            text, stop = formatted.prompt, formatted.stop
        elif self.chat_format == "chatml":
            text, stop = chatml_prompt(messages), ["<|im_end|>"]
        else:
            text, stop = gemma_prompt(messages), ["<end_of_turn>"]
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        with self._vocab_lock:
            tokens = self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return Prompt(tokens, [s for s in stops if s])

    def generate(
        self,
        prompt: Prompt,
        params: Params,
        cancelled: threading.Event,
        check: Callable[[], None] = lambda: None,
        keep_as: str | None = None,
    ) -> Iterator[str | Finished]:
        """Pieces of text, then one Finished. ``check`` runs before each token (the lease
        fence); it and ``cancelled`` stop the generation within one token. ``keep_as``:
        a conversation whose saved state may start this prompt, and which keeps the
        state this answer ends in (prefix reuse)."""
        grammar = grammar_for(params, self.grammar_limits)
        with self._lock:
            llama = self.llama
            check()
            if keep_as is not None:
                self.prefixes.restore(llama, keep_as, prompt.tokens)
            stream = llama.create_completion(
                prompt=prompt.tokens,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=[*prompt.stop, *params.stop],
                seed=params.seed,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repeat_penalty=params.repeat_penalty,
                grammar=grammar,
                stream=True,
            )
            reason = "stop"
            try:
                for chunk in cast(Iterator[dict[str, Any]], stream):
                    if cancelled.is_set():
                        raise Cancelled()
                    check()
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        yield choice["text"]
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
            finally:
                stream.close()  # type: ignore[union-attr]
            completion = max(0, llama.n_tokens - len(prompt.tokens))
            if keep_as is not None:
                self.prefixes.keep(llama, keep_as)
            yield Finished(reason, len(prompt.tokens), completion)
