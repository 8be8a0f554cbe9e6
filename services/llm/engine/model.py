"""One model and one context, on llama.cpp's low-level API: the weights (with N layers on
the GPU), a KV cache shared by every sequence, and the batch that feeds them.

Everything here blocks and belongs to one thread (the scheduler's, services/llm/engine/
batch.py). "Offloading" is a new context on weights loaded with 0 GPU layers: a llama.cpp
model cannot move its layers once loaded. The sequences that were running survive it:
each one's KV cells are copied to the host before, and back into the new context after
(``llama_state_seq_get_data`` / ``_set_data``).
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """What a context is made of: its KV cells (shared by all sequences), the tokens one
    decode call may carry, how many sequences it holds and the threads that run it."""

    cells: int
    batch: int
    sequences: int
    threads: int


class Model:
    def __init__(self, path: Path, shape: Shape, gpu_layers: int) -> None:
        self.path = path
        self.shape = shape
        self.gpu_layers = gpu_layers
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path.name}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        on_card = gpu_layers > 0
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = shape.cells
        context.n_batch = shape.batch
        context.n_ubatch = shape.batch
        context.n_seq_max = shape.sequences
        context.kv_unified = True  # one pool of cells: one long sequence may use all of them
        context.n_threads = shape.threads
        context.n_threads_batch = shape.threads
        context.no_perf = True
        # Offloaded means off the card: no KV cache there and no large batches sent to it
        # (llama.cpp's op offload), which would use the GPU without the lease and keep a
        # compute buffer of the vocabulary's logits on it (measured on an H100).
        context.offload_kqv = on_card
        context.op_offload = on_card
        self.context_params = context
        self.ctx = llama_cpp.llama_init_from_model(self.model, context)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context of {shape.cells} cells for {path.name}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.cells = int(llama_cpp.llama_n_ctx(self.ctx))
        self.batch = llama_cpp.llama_batch_init(shape.batch, 0, 1)
        self.n_batch = 0

    # -- the batch --------------------------------------------------------------------------

    def clear_batch(self) -> None:
        self.n_batch = 0

    def add(self, token: int, position: int, sequence: int, logits: bool) -> int:
        """Put one token in the batch; returns its index (where its logits will be)."""
        i = self.n_batch
        batch = self.batch
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = sequence
        batch.logits[i] = logits
        self.n_batch += 1
        return i

    def decode(self) -> int:
        """Decode the batch: 0 on success, 1 when the KV cache had no room, < 0 on error."""
        self.batch.n_tokens = self.n_batch
        return int(llama_cpp.llama_decode(self.ctx, self.batch))

    def logits(self, index: int) -> np.ndarray:
        """The logits of the batch's ``index``-th token (a view: copy before the next decode)."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    # -- the KV cache -----------------------------------------------------------------------

    def forget(self, sequence: int, start: int = 0) -> None:
        """Free a sequence's cells from position ``start`` on."""
        llama_cpp.llama_memory_seq_rm(self.memory, sequence, start, -1)

    def share(self, source: int, target: int, length: int) -> None:
        """Give ``target`` the first ``length`` cells of ``source`` (shared, not copied)."""
        llama_cpp.llama_memory_seq_cp(self.memory, source, target, 0, length)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def save(self, sequence: int) -> bytes:
        size = int(llama_cpp.llama_state_seq_get_size(self.ctx, sequence))
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(self.ctx, buffer, size, sequence))
        return bytes(buffer)[:written]

    def restore(self, sequence: int, data: bytes) -> bool:
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return int(llama_cpp.llama_state_seq_set_data(self.ctx, buffer, len(data), sequence)) == len(data)

    # -- tokens -----------------------------------------------------------------------------

    def piece(self, token: int) -> bytes:
        """The bytes a token spells (control tokens spell nothing)."""
        buffer = ctypes.create_string_buffer(256)
        size = int(llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False))
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = int(llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False))
        return buffer.raw[: max(0, size)]

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def describe(self) -> dict[str, Any]:
        return {"cells": self.cells, "batch": self.shape.batch, "sequences": self.shape.sequences}


def measure_chunk(model: Model, parallel: int, least: int = 16, most: int = 512) -> tuple[int, dict[str, float]]:
    """The prefill chunk that costs about one decode step of a full batch, measured on
    this device: the time of one step of ``parallel`` sequences, and the prefill speed.
    Leaves the KV cache empty."""
    try:
        prompt = 64
        model.clear_batch()
        for position in range(prompt):
            model.add(1 + position % 100, position, 0, position == prompt - 1)
        model.decode()  # warms up
        model.clear()
        model.clear_batch()
        for position in range(prompt):
            model.add(1 + position % 100, position, 0, position == prompt - 1)
        started = time.perf_counter()
        model.decode()
        prefill_s = time.perf_counter() - started
        for sequence in range(1, parallel):
            model.share(0, sequence, prompt)
        step_s = []
        for step in range(3):
            model.clear_batch()
            for sequence in range(parallel):
                model.add(7, prompt + step, sequence, True)
            started = time.perf_counter()
            model.decode()
            step_s.append(time.perf_counter() - started)
        decode_s = sorted(step_s)[1]
    finally:
        model.clear()
        model.clear_batch()
    per_token = prefill_s / prompt
    chunk = max(least, min(most, int(decode_s / per_token)))
    return chunk, {"decode_step_ms": round(decode_s * 1000, 2), "prefill_tokens_per_s": round(1 / per_token, 1)}
