"""The LLM engine: one model, many sequences generated at once.

- ``prompts``: chats as the tokens the model reads (its template, its vocabulary, no weights);
- ``grammar``: grammars bounded, compiled and measured before they are used;
- ``model``: the weights and one context on llama.cpp's low-level API;
- ``sampling``: each sequence's own sampler (parameters, seed, penalties, grammar);
- ``kv``: prefixes kept in the KV cache for the requests that start the same way;
- ``batch``: the scheduler that runs them all, one llama.cpp batch per step.

``Engine`` puts them together for the chat service: ``submit`` a prompt and its
``Params``, iterate the ``Generation``. The GPU policy (services/llm/gpu_policy.py) moves
its layers (``load``) and pauses it (``hold``/``open``) at token boundaries.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_grammar

from services.llm.engine.batch import Cancelled, Finished, Generation, Request, Scheduler, TokenLogprob
from services.llm.engine.grammar import GrammarGuard, GrammarLimits, GrammarRefused, check_schema, route_llama_logs
from services.llm.engine.model import Model, Shape
from services.llm.engine.prompts import Message, Prompt, Vocabulary, into_system
from services.llm.engine.sampling import SamplingParams
from services.llm.tools.schema_grammar import Unenforceable, gbnf

__all__ = [
    "BadSchema",
    "Cancelled",
    "Engine",
    "Finished",
    "Generation",
    "Message",
    "Params",
    "Prompt",
    "TokenLogprob",
    "can_offload",
    "grammar_text",
    "into_system",
]

log = logging.getLogger(__name__)


def can_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU at all."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def default_parallel() -> int:
    """Sequences decoded together when GEMMA_PARALLEL is not set: 8 on the CPU, where the
    aggregate speed stops growing past 8 on 2 cores (docs/architecture.md, Many users at once), 32 on
    a GPU, where a batch of 32 small sequences costs the card little more than one."""
    return 32 if can_offload() else 8


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
    """GBNF that constrains the output (tool calls, services.llm.tools.calls; text-to-SQL)."""
    grammar_param: str = "tools"
    """The request field ``grammar`` was made from, named when it is refused."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    """None, or how many of the most likely tokens to report beside each token's own
    log-probability (0: its own only)."""

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repeat_penalty=self.repeat_penalty,
            logit_bias=dict(self.logit_bias),
        )


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


class Engine:
    def __init__(
        self,
        path: Path,
        *,
        context_size: int,
        batch_size: int = 512,
        threads: int | None = None,
        chat_format: str | None = None,
        grammar_limits: GrammarLimits | None = None,
        parallel: int | None = None,
        prefill_chunk: int = 0,
        cache_entries: int = 32,
        cache_cells: int | None = None,
        budget_s: float = 300.0,
        grammar_step_ms: float = 10.0,
    ) -> None:
        route_llama_logs()
        llama_cpp.llama_backend_init()
        self.path = path
        self.vocabulary = Vocabulary(path, context_size, chat_format)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocabulary.vocab))
        self.n_ctx = self.vocabulary.n_ctx
        self.chat_format = self.vocabulary.chat_format
        self.metadata = self.vocabulary.metadata
        self.longest_piece = self.vocabulary.longest_piece
        self.grammar_limits = grammar_limits or GrammarLimits()
        self.guard = GrammarGuard(self.vocabulary.vocab, self.grammar_limits)
        self.parallel = parallel or default_parallel()
        self.threads = threads or os.cpu_count() or 1
        """CPU threads llama.cpp decodes with (GEMMA_THREADS; default: every core)."""
        self._prefill_chunk = prefill_chunk
        self._batch = max(batch_size, prefill_chunk + self.parallel, self.parallel + 16)
        self._cache_entries = cache_entries
        self._cache_cells = cache_cells if cache_cells is not None else self.n_ctx // 2
        self._grammar_step_ms = grammar_step_ms
        self.budget_s = budget_s
        """A generation's wall-clock budget (GEMMA_GENERATION_BUDGET_S)."""
        self._scheduler: Scheduler | None = None

    @property
    def max_prompt_chars(self) -> int:
        """More characters than this cannot fit the context: no token spells more than
        ``longest_piece`` of them. Text past it is refused before it is tokenized."""
        return self.n_ctx * self.longest_piece

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("the model is not loaded")
        return self._scheduler

    @property
    def gpu_layers(self) -> int:
        return self._scheduler.model.gpu_layers if self._scheduler is not None else 0

    def _model(self, gpu_layers: int) -> Model:
        shape = Shape(
            cells=self.n_ctx, batch=self._batch, sequences=self.parallel + self._cache_entries, threads=self.threads
        )
        return Model(self.path, shape, gpu_layers)

    def load(self, gpu_layers: int) -> float:
        """(Blocking.) The model with ``gpu_layers`` on the GPU; returns the seconds it took.
        Running sequences carry over (services/llm/engine/batch.py, ``reload``)."""
        started = time.monotonic()
        if self._scheduler is None:
            self._scheduler = Scheduler(
                self._model,
                gpu_layers=gpu_layers,
                parallel=self.parallel,
                chunk=self._prefill_chunk,
                cache_entries=self._cache_entries,
                cache_cells=self._cache_cells,
                grammar_step_ms=self._grammar_step_ms,
            )
            return time.monotonic() - started
        return self._scheduler.call(lambda: self.scheduler.reload(gpu_layers)).result()

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        self.vocabulary.close()

    def count(self, text: str) -> int:
        return self.vocabulary.count(text)

    def prompt(self, messages: Sequence[Message]) -> Prompt:
        return self.vocabulary.prompt(messages)

    def submit(
        self,
        prompt: Prompt,
        params: Params,
        *,
        subject: str = "",
        public_prefix: int = 0,
        keep: bool = True,
        group: str | None = None,
    ) -> Generation:
        """Start generating (on the event loop's thread). The grammar must have passed the
        guard (the chat service checks every request before it starts)."""
        found = grammar_text(params, self.grammar_limits)
        request = Request(
            tokens=list(prompt.tokens),
            max_tokens=params.max_tokens,
            sampling=params.sampling(),
            stop=[*prompt.stop, *params.stop],
            grammar=found[0] if found else None,
            subject=subject,
            public_prefix=public_prefix,
            deadline=time.monotonic() + self.budget_s,
            keep=keep,
            logprobs=params.logprobs,
            group=group,
        )
        return self.scheduler.submit(request)

    def info(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"threads": self.threads, "context_size": self.n_ctx, "budget_s": self.budget_s}
        if self._scheduler is not None:
            shown |= self._scheduler.info() | {"prefill_chunk_measured": self._scheduler.chunk_measured}
        return shown
