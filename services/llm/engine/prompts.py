"""Chats as the exact tokens a model reads: its chat template, its vocabulary.

The vocabulary is loaded alone (no weights, no context), so prompts are rendered,
counted and fitted outside the scheduler's thread, even while the model itself is
being reloaded.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

log = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    stop: list[str]


def into_system(messages: Sequence[Message], text: str) -> list[Message]:
    """``text`` appended to the first system message, or one made for it: every chat
    template accepts a system message there."""
    out = list(messages)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


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


def longest_piece(vocab: Any) -> int:
    """The most characters one token of ``vocab`` spells (81 for SmolLM2, 31 for Gemma 3)."""
    buffer = ctypes.create_string_buffer(1024)
    longest = 1
    for token in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
        if size > 0:
            longest = max(longest, len(buffer.raw[:size].decode("utf-8", "replace")))
    return longest


class Vocabulary:
    """A model's vocabulary and chat template, without its weights."""

    def __init__(self, path: Path, context_size: int, chat_format: str | None) -> None:
        self._llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._lock = threading.Lock()
        self.vocab = self._llama._model.vocab
        self.metadata: dict[str, str] = dict(self._llama.metadata)
        arch = self.metadata.get("general.architecture", "")
        trained = int(self.metadata.get(f"{arch}.context_length", context_size))
        self.n_ctx = min(context_size, trained)
        """The longest sequence: the context window, capped at what the model was trained for."""
        if self.n_ctx < context_size:
            log.info(
                "context capped at what the model was trained for", extra={"asked": context_size, "n_ctx": self.n_ctx}
            )
        template = None if chat_format else self.metadata.get("tokenizer.chat_template")
        self.chat_format = chat_format or ("gguf" if template else "gemma")
        self._formatter: Jinja2ChatFormatter | None = None
        if template:
            eos = self._llama.detokenize([self._llama.token_eos()]).decode("utf-8", "ignore")
            bos = self._llama.detokenize([self._llama.token_bos()]).decode("utf-8", "ignore")
            self._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        self.longest_piece = longest_piece(self.vocab)

    def count(self, text: str) -> int:
        """Tokens in ``text`` alone."""
        with self._lock:
            return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def tokens(self, text: str) -> list[int]:
        """Raw text as tokens (no template; special tokens read as text)."""
        with self._lock:
            return list(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def raw(self, text: str) -> list[int]:
        """A completion's prompt: the text as tokens, after the model's BOS where its
        vocabulary asks for one (special tokens read as text)."""
        with self._lock:
            return list(self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def text(self, tokens: list[int]) -> str:
        """Tokens as the text they spell."""
        with self._lock:
            return bytes(self._llama.detokenize(tokens)).decode("utf-8", "replace")

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
        with self._lock:
            tokens = self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return Prompt(tokens, [s for s in stops if s])

    def close(self) -> None:
        self._llama.close()
