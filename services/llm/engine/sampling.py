"""Each sequence's own sampler: its parameters, seed, penalties and grammar.

The chain (logit bias, penalties, then greedy, or top-k/top-p/min-p/temperature and a
seeded draw) runs on a copy of the sequence's logits. A grammar is not applied to the
whole vocabulary first, as llama-cpp-python's high-level API does at every token: the
token the chain picks is checked against the grammar alone (one candidate), and only
when the grammar refuses it is the grammar applied to the whole vocabulary and the
chain run again on what it allows (llama.cpp's own server samples this way). Greedy
answers are the same either way; the dear full-vocabulary step becomes the exception.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from services.llm.engine.grammar import TOKEN_DATA

TOP_K = 40
MIN_P = 0.05
PENALTY_WINDOW = 64
"""Tokens the penalties look back over (llama.cpp's default)."""


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class Choice:
    token: int
    resampled: bool
    """The grammar refused the chain's first pick: the whole vocabulary was masked."""
    grammar_ms: float
    """CPU time the grammar took for this token."""
    logprob: float | None = None
    """The token's log-probability under the model (asked for with ``logprobs``)."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """The ``top_logprobs`` most likely tokens and theirs, most likely first."""


def log_probabilities(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The token's log-probability under the model's own distribution (the raw logits'
    softmax, before any bias, penalty, temperature or grammar, as OpenAI reports it),
    and the ``top`` most likely tokens with theirs."""
    values = logits.astype(np.float64)
    peak = float(values.max())
    total = peak + float(np.log(np.exp(values - peak).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-values, top - 1)[:top]
        ids = ids[np.argsort(-values[ids], kind="stable")]
        best = [(int(i), float(values[i] - total)) for i in ids]
    return float(values[token] - total), best


class Sampler:
    def __init__(
        self, vocab: Any, n_vocab: int, params: SamplingParams, grammar: str | None, logprobs: int | None = None
    ) -> None:
        """``logprobs``: None, or how many of the most likely tokens to report beside each
        token's own log-probability (0: its own only)."""
        self._n_vocab = n_vocab
        self._logprobs = logprobs
        self._tokens = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._pointer = self._tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        self._one = np.zeros(1, dtype=TOKEN_DATA)
        self._one_pointer = self._one.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias.items()):
                biases[i] = llama_cpp.llama_logit_bias(token, bias)
            add(self.chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            add(
                self.chain,
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, PENALTY_WINDOW, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
                ),
            )
        if params.temperature <= 0:
            add(self.chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(self.chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
            add(self.chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(self.chain, llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
            add(self.chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
            add(self.chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self.grammar = None
        if grammar is not None:
            self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
            if not self.grammar:
                llama_cpp.llama_sampler_free(self.chain)
                raise ValueError("llama.cpp refused the grammar")

    def _apply(self, sampler: Any, count: int, pointer: Any) -> int:
        array = llama_cpp.llama_token_data_array(pointer, count, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        return int(array.selected)

    def _fill(self, logits: np.ndarray) -> None:
        tokens = self._tokens
        tokens["id"] = self._ids
        tokens["logit"] = logits
        tokens["p"] = 0.0

    def choose(self, logits: np.ndarray) -> Choice:
        """The next token from ``logits`` (the sequence's row; read before the next decode)."""
        choice = self._choose(logits)
        if self._logprobs is not None:
            choice.logprob, choice.top = log_probabilities(logits, choice.token, self._logprobs)
        return choice

    def _choose(self, logits: np.ndarray) -> Choice:
        self._fill(logits)
        picked = self._apply(self.chain, self._n_vocab, self._pointer)
        token = int(self._tokens["id"][picked])
        if self.grammar is None:
            llama_cpp.llama_sampler_accept(self.chain, token)
            return Choice(token, False, 0.0)
        started = time.thread_time()
        self._one["id"][0] = token
        self._one["logit"][0] = logits[token]
        self._one["p"][0] = 0.0
        self._apply(self.grammar, 1, self._one_pointer)
        resampled = not np.isfinite(self._one["logit"][0])
        if resampled:
            self._fill(logits)
            array = llama_cpp.llama_token_data_array(self._pointer, self._n_vocab, -1, False)
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
            size = int(array.size)
            if not np.isfinite(self._tokens["logit"][:size]).any():
                raise GrammarDeadEnd()
            picked = self._apply(self.chain, size, self._pointer)
            token = int(self._tokens["id"][picked])
        spent = (time.thread_time() - started) * 1000
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        return Choice(token, resampled, spent)

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


class GrammarDeadEnd(Exception):
    """The grammar allows no token at all (it is complete and the model must stop)."""
