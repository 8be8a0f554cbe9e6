"""Saved llama.cpp states of recent conversations, so that a follow-up turn does not read
its whole history again (prefix reuse), within a memory budget, least recently used out.

llama-cpp-python already skips the part of a prompt that the context holds from the
request before; with several conversations taking turns that part is another
conversation's. So after each conversation turn its state (the KV cache and the tokens
it holds) is saved, and before that conversation's next turn it is loaded back when it
covers more of the new prompt than the context does. Only the state proper is kept: the
logits llama-cpp-python would copy beside it (n_tokens x vocabulary floats, 40 MB for
200 tokens of SmolLM2) are not needed, since a loaded state is evaluated again from its
last token. The states are dropped whenever the model is reloaded (layers moved on or
off the card): a state belongs to the context it came from.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np


@dataclass
class _State:
    input_ids: np.ndarray
    n_tokens: int
    data: bytes
    seed: int


def _common(a: Any, b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixStates:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._states: OrderedDict[str, _State] = OrderedDict()
        self.bytes = 0
        self.restored = 0
        """Turns that started from a saved state."""
        self.reused_tokens = 0
        """Prompt tokens those turns did not read again."""

    def keep(self, llama: llama_cpp.Llama, key: str) -> None:
        """Save ``llama``'s state under ``key`` (a conversation), evicting the least
        recently used states past the budget."""
        if self.budget_bytes <= 0:
            return
        ctx = llama.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        if size > self.budget_bytes:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(ctx, buffer, size)
        state = _State(llama.input_ids[: llama.n_tokens].copy(), llama.n_tokens, bytes(buffer)[:written], llama._seed)
        self._drop(key)
        self._states[key] = state
        self.bytes += len(state.data)
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self._states)))

    def restore(self, llama: llama_cpp.Llama, key: str, tokens: list[int]) -> bool:
        """Load ``key``'s state if it holds more of ``tokens`` than the context does."""
        state = self._states.get(key)
        if state is None:
            return False
        self._states.move_to_end(key)
        saved = _common(state.input_ids, tokens)
        if saved <= _common(llama.input_ids[: llama.n_tokens], tokens):
            return False
        # What Llama.load_state does, without the logits it would need a copy of.
        llama.input_ids[: state.n_tokens] = state.input_ids
        llama.n_tokens = state.n_tokens
        llama._requires_eval = True
        llama._seed = state.seed
        array = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if llama_cpp.llama_state_set_data(llama.ctx, array, len(state.data)) != len(state.data):
            llama.reset()
            self._drop(key)
            return False
        self.restored += 1
        self.reused_tokens += saved
        return True

    def clear(self) -> None:
        self._states.clear()
        self.bytes = 0

    def info(self) -> dict[str, Any]:
        return {
            "budget_mb": round(self.budget_bytes / 1_048_576, 1),
            "states": len(self._states),
            "mb": round(self.bytes / 1_048_576, 2),
            "restored": self.restored,
            "reused_tokens": self.reused_tokens,
        }

    def _drop(self, key: str) -> None:
        state = self._states.pop(key, None)
        if state is not None:
            self.bytes -= len(state.data)
