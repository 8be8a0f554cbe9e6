"""Grammars that cannot crash or stall the model: bounded before llama.cpp sees them,
then compiled once on the service's vocabulary and their cost measured.

Why each gate exists (measured on llama-cpp-python 0.3.36, SmolLM2's 49,152 tokens):

- llama.cpp's GBNF parser recurses once per nested group. A json_schema string of
  ``minLength`` 20,000 becomes 20,000 nested optional groups and overflows the stack of
  the thread that parses it: a segfault that takes the whole service down. At 5,000 the
  parser refuses it and prints the whole grammar to stderr.
- A grammar's cost per token grows with the alternatives alive at once: llama.cpp walks
  every live stack for every candidate token. Text-to-SQL over 8 tables of 64 columns
  costs up to 0.9 s for one masked step over the vocabulary.

So, cheapest first:

1. **The schema**, before any conversion (``check_schema``): repetition counts
   (``minLength``/``maxLength``, ``minItems``/``maxItems``, ``{n,m}`` in patterns),
   numeric bounds within the 16 digits the grammar spells, the nesting depth, the number
   of nodes, and ``$ref`` only inside the document.
2. **The GBNF text** (``GrammarGuard.check``): its bytes, and the depth of its groups
   (the parser's recursion).
3. **llama.cpp itself**: the parse (a grammar it refuses is a 400, not a log line), the
   compile time, and a short random walk through the grammar timing each full-vocabulary
   masked step. Times are this thread's CPU time, not wall-clock time, so that a busy
   machine does not make a grammar look dearer than it is. A grammar that passed is
   remembered (by its text), so a tool set or a SQL schema used again costs nothing.

Every refusal is a ``GrammarRefused`` naming the request field (``param``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import random
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

log = logging.getLogger(__name__)

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
"""llama_token_data, as numpy lays it out (checked against ctypes at import)."""
assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

REPETITION = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
LARGEST_BOUND = 10**16 - 1
"""The grammar spells integral parts of at most 16 digits (schema_grammar.MAX_DIGITS)."""
MAX_PATTERN = 1024
"""Characters of one ``pattern``."""
COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
CHILDREN = ("items", "additionalProperties", "prefixItems", "anyOf", "oneOf", "allOf", "not")
NAMED_CHILDREN = ("properties", "$defs", "definitions")


class GrammarRefused(ValueError):
    """A schema or grammar past a bound, or one llama.cpp cannot use; ``param`` names the field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarLimits:
    max_repeat: int = 1000
    """Largest repetition count: string lengths, item counts, ``{n,m}`` in patterns."""
    max_depth: int = 32
    """Deepest nesting of a schema (objects in arrays in objects ...)."""
    max_nodes: int = 4000
    """Subschemas and enum values in one schema."""
    max_bytes: int = 256 * 1024
    """Bytes of GBNF text."""
    max_nesting: int = 2048
    """Nested groups in the GBNF text: the depth llama.cpp's parser recurses to."""
    max_compile_ms: float = 500.0
    """CPU time llama.cpp may take to parse the grammar."""
    max_us_per_token: float = 5.0
    """CPU microseconds per candidate token of the dearest masked step on the probe's walk
    (a step checks the whole vocabulary). Per token, so that one bound holds for
    vocabularies of any size. Measured: a plain object schema 0.4 (SmolLM2's 49,152
    tokens: 20 ms a step) and 0.5 (Gemma 3's 262,144: 120 ms); the example databases' SQL
    0.6 and 0.9 to 1.5; SQL over 8 tables of 64 columns 18 (0.9 s a step on SmolLM2)."""
    probe_steps: int = 8
    """Steps of the random walk that times the masked steps (fewer once the walk has
    spent ``probe_budget`` times the dearest allowed step in all)."""
    probe_budget: float = 4.0
    """The walk's CPU time in all, in dearest allowed steps. It must leave room for the
    dear step to come after a few cheap ones: SQL over 8 tables of 64 columns costs 70,
    5, 70, 70 ms, then 950 ms once a table is named (SmolLM2); a budget of one step
    stopped the walk before it and let the grammar through."""


@dataclass(frozen=True)
class Cost:
    """What a grammar measured: its parse, and its dearest full-vocabulary masked step
    (over ``steps`` steps of the walk)."""

    compile_ms: float
    step_ms: float
    steps: int


# -- gate 1: the schema ------------------------------------------------------------------


def _count(value: Any, key: str, where: str, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != int(value):
        raise GrammarRefused(f"{where}.{key} must be a non-negative integer", f"{where}.{key}".lstrip("."))
    if value > limit:
        raise GrammarRefused(
            f"{where}.{key} is {int(value)}; at most {limit} can be enforced (GEMMA_GRAMMAR_MAX_REPEAT)",
            f"{where}.{key}".lstrip("."),
        )


def _bound(value: Any, key: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GrammarRefused(f"{where}.{key} must be a finite number", f"{where}.{key}".lstrip("."))
    if abs(value) > LARGEST_BOUND:
        raise GrammarRefused(
            f"{where}.{key} has more than 16 digits, more than the grammar can spell", f"{where}.{key}".lstrip(".")
        )


def _pattern(value: Any, where: str, limit: int) -> None:
    param = f"{where}.pattern".lstrip(".")
    if not isinstance(value, str):
        raise GrammarRefused(f"{where}.pattern must be a string", param)
    if len(value) > MAX_PATTERN:
        raise GrammarRefused(f"{where}.pattern is over {MAX_PATTERN} characters", param)
    for match in REPETITION.finditer(value):
        for number in match.groups():
            if number and int(number) > limit:
                raise GrammarRefused(
                    f"{where}.pattern repeats {number} times; at most {limit} can be enforced "
                    "(GEMMA_GRAMMAR_MAX_REPEAT)",
                    param,
                )
    depth = deepest = 0
    for char in value:
        depth += char == "("
        depth -= char == ")"
        deepest = max(deepest, depth)
    if deepest > 64:
        raise GrammarRefused(f"{where}.pattern nests {deepest} groups; at most 64", param)


def check_schema(schema: Any, limits: GrammarLimits, where: str = "") -> None:
    """Gate 1: refuse (GrammarRefused, naming the field under ``where``) a schema whose
    grammar would be too large or too deep for llama.cpp, before it is converted."""
    nodes = 0
    stack: list[tuple[Any, str, int]] = [(schema, where, 0)]
    while stack:
        node, at, depth = stack.pop()
        if isinstance(node, list):
            for index, item in enumerate(node):
                stack.append((item, f"{at}[{index}]", depth))
            continue
        if not isinstance(node, dict):
            continue
        enum = node.get("enum")
        nodes += 1 + (len(enum) if isinstance(enum, list) else 0)
        if nodes > limits.max_nodes:
            raise GrammarRefused(f"the schema has over {limits.max_nodes} subschemas and enum values", where or None)
        if depth > limits.max_depth:
            raise GrammarRefused(
                f"{at or 'the schema'} nests deeper than {limits.max_depth} levels", at.lstrip(".") or where or None
            )
        for key in COUNTS:
            if key in node:
                _count(node[key], key, at, limits.max_repeat)
        for key in BOUNDS:
            if key in node:
                _bound(node[key], key, at)
        if "pattern" in node:
            _pattern(node["pattern"], at, limits.max_repeat)
        ref = node.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise GrammarRefused(
                f"{at}.$ref must point inside the schema (#/...); remote schemas are not fetched",
                f"{at}.$ref".lstrip("."),
            )
        for key in CHILDREN:
            if key in node:
                stack.append((node[key], f"{at}.{key}", depth + 1))
        for key in NAMED_CHILDREN:
            children = node.get(key)
            if isinstance(children, dict):
                for name, child in children.items():
                    stack.append((child, f"{at}.{key}.{name}", depth + 1))


# -- gate 2: the text ---------------------------------------------------------------------


def nesting(grammar: str) -> int:
    """The deepest nesting of groups in GBNF text (outside literals, classes and comments)."""
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        char = grammar[i]
        if char in '"[':
            close = '"' if char == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif char == "#":
            while i < n and grammar[i] != "\n":
                i += 1
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
        i += 1
    return deepest


# -- gate 3: llama.cpp ---------------------------------------------------------------------


class GrammarGuard:
    """Checks grammars against one model's vocabulary (``vocab``: a ``llama_vocab`` pointer).
    Thread-safe; the probes themselves run one at a time."""

    def __init__(self, vocab: Any, limits: GrammarLimits, remember: int = 256) -> None:
        self._vocab = vocab
        self.limits = limits
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self._tokens = np.zeros(self._n_vocab, dtype=TOKEN_DATA)
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._lock = threading.Lock()
        self._passed: OrderedDict[str, Cost] = OrderedDict()
        self._remember = remember

    def check(self, grammar: str, param: str | None, what: str = "the grammar") -> Cost:
        """Gates 2 and 3. Returns the grammar's measured cost; raises GrammarRefused."""
        size = len(grammar.encode("utf-8"))
        if size > self.limits.max_bytes:
            raise GrammarRefused(
                f"{what} makes {size // 1024} KB of grammar; at most {self.limits.max_bytes // 1024} KB "
                "(GEMMA_GRAMMAR_MAX_BYTES)",
                param,
            )
        depth = nesting(grammar)
        if depth > self.limits.max_nesting:
            raise GrammarRefused(
                f"{what} makes a grammar nested {depth} deep; at most {self.limits.max_nesting}", param
            )
        key = hashlib.sha256(grammar.encode("utf-8")).hexdigest()
        with self._lock:
            known = self._passed.get(key)
            if known is not None:
                self._passed.move_to_end(key)
                return known
            cost = self._probe(grammar, param, what)
            self._passed[key] = cost
            while len(self._passed) > self._remember:
                self._passed.popitem(last=False)
            return cost

    def _probe(self, grammar: str, param: str | None, what: str) -> Cost:
        started = time.thread_time()
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        compile_ms = (time.thread_time() - started) * 1000
        if not sampler:
            raise GrammarRefused(f"{what} cannot be used: llama.cpp refused its grammar", param)
        try:
            if compile_ms > self.limits.max_compile_ms:
                raise GrammarRefused(
                    f"{what} takes {compile_ms:.0f} ms to compile; at most {self.limits.max_compile_ms:.0f} "
                    "(GEMMA_GRAMMAR_MAX_COMPILE_MS)",
                    param,
                )
            dearest, steps = self._walk(sampler)
            per_token = dearest * 1000 / self._n_vocab
            if per_token > self.limits.max_us_per_token:
                raise GrammarRefused(
                    f"{what} is too dear to enforce: {dearest:.0f} ms for a step over this model's "
                    f"{self._n_vocab} tokens, {per_token:.1f} us each; at most {self.limits.max_us_per_token:g} "
                    "(GEMMA_GRAMMAR_MAX_US_PER_TOKEN). Ask for a simpler shape",
                    param,
                )
            return Cost(round(compile_ms, 3), round(dearest, 3), steps)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    @property
    def max_step_ms(self) -> float:
        """The dearest full-vocabulary step a grammar may take on this vocabulary."""
        return self.limits.max_us_per_token * self._n_vocab / 1000

    def _walk(self, sampler: Any) -> tuple[float, int]:
        """Random steps through the grammar, each timing a masked step over every token.
        Stops early at a dead end, or at the first step past the bound."""
        chooser = random.Random(0)  # noqa: S311 - a walk, not a secret
        dearest = 0.0
        steps = 0
        tokens = self._tokens
        pointer = tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        walk_started = time.thread_time()
        for _ in range(self.limits.probe_steps):
            tokens["id"] = self._ids
            tokens["logit"] = 0.0
            tokens["p"] = 0.0
            array = llama_cpp.llama_token_data_array(pointer, self._n_vocab, -1, False)
            started = time.thread_time()
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
            spent = (time.thread_time() - started) * 1000
            steps += 1
            dearest = max(dearest, spent)
            spent_in_all = (time.thread_time() - walk_started) * 1000
            if dearest > self.max_step_ms or spent_in_all > self.limits.probe_budget * self.max_step_ms:
                break
            kept = tokens[: array.size]
            allowed = kept["id"][np.isfinite(kept["logit"])]
            picks = [int(allowed[chooser.randrange(len(allowed))]) for _ in range(8)] if len(allowed) else []
            going_on = [t for t in picks if not llama_cpp.llama_vocab_is_eog(self._vocab, t)]
            if not going_on:  # the grammar is (almost) done: nothing dearer lies ahead on this walk
                break
            llama_cpp.llama_sampler_accept(sampler, going_on[0])
        return dearest, steps


# -- llama.cpp's own log ------------------------------------------------------------------

_llama_log = logging.getLogger("llama.cpp")
GGML_LOG_ERROR = 4
"""ggml's levels here: 1 debug, 2 info, 3 warning, 4 error, 5 a line continued."""
LOG_LINE_CHARS = 300
"""llama.cpp prints a refused grammar whole; the log keeps this much of a line."""


@llama_cpp.llama_log_callback
def _to_logging(level: int, text: bytes, _: ctypes.c_void_p) -> None:
    if level != GGML_LOG_ERROR:  # only errors: llama.cpp's info and warnings are noise in a service log
        return
    with contextlib.suppress(Exception):
        line = text.decode("utf-8", "replace").strip()
        if line:
            _llama_log.warning("llama.cpp: %s", line[:LOG_LINE_CHARS])


def route_llama_logs() -> None:
    """llama.cpp's log lines into Python's logging: errors only, each cut short."""
    llama_cpp.llama_log_set(_to_logging, ctypes.c_void_p(0))
