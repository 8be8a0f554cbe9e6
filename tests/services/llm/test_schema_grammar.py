"""Bounded numbers in grammars: each rule spells every value in its bounds and none outside."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
from llama_cpp import llama_grammar

from services.llm.engine import BadSchema, Params, grammar_text
from services.llm.engine.grammar import GrammarLimits
from services.llm.tools.schema_grammar import Unenforceable, decimal_rules, gbnf, integer_bounds, integer_rule

RANGES = [(None, None), (0, None), (None, 0), (1, 7), (1, 600), (-5, 5), (-120, -3), (None, -7), (13, None), (0, 0)]


def as_regex(rule: str) -> re.Pattern[str]:
    """A rule of quoted literals, character classes, repetitions and alternatives, as a regex."""
    body = re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), rule).replace(" ", "")
    return re.compile(f"^(?:{body})$")


@pytest.mark.parametrize(("low", "high"), [*RANGES, (-1999, 2001), (99, 1000), (-1000, -999)])
def test_an_integer_rule_spells_exactly_the_integers_in_its_bounds(low: int | None, high: int | None) -> None:
    spelled = as_regex(integer_rule(low, high))
    for n in range(-2500, 2500):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(spelled.match(str(n))) == inside, n
    for bad in ("01", "-0", "007", "+1", "", "1e3"):
        assert not spelled.match(bad)


@pytest.mark.parametrize(("low", "high"), RANGES)
def test_a_number_rule_spells_only_numbers_in_its_bounds(low: int | None, high: int | None) -> None:
    spelled = as_regex(" | ".join([f"({integer_rule(low, high)})", *decimal_rules(low, high)]))
    shuffled = random.Random(7)
    matched = 0
    for _ in range(4000):
        x = round(shuffled.uniform(-700, 700), shuffled.choice([1, 2, 3]))
        if spelled.match(repr(x)):
            matched += 1
            assert (low is None or x >= low) and (high is None or x <= high), x
    assert matched > 0 or (low, high) == (0, 0)


def test_bounds_become_integer_ends() -> None:
    assert integer_bounds({"minimum": 1, "maximum": 7}) == (1, 7)
    assert integer_bounds({"exclusiveMinimum": 0, "exclusiveMaximum": 10}) == (1, 9)
    assert integer_bounds({"minimum": 0.5, "maximum": 2.5}) == (1, 2)
    assert integer_bounds({"type": "integer"}) == (None, None)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}}},
        {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}}},
        {"type": ["integer", "null"], "maximum": -3},
        {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0}},
    ],
)
def test_llama_cpp_parses_the_grammars(schema: dict[str, Any]) -> None:
    llama_grammar.LlamaGrammar.from_string(gbnf(schema), verbose=False)  # raises if it cannot


def test_what_no_grammar_enforces_is_refused_with_its_place() -> None:
    with pytest.raises(Unenforceable) as raised:
        gbnf({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}})
    assert raised.value.where == ".properties.tags"
    with pytest.raises(Unenforceable):
        gbnf({"type": "number", "minimum": 0.2, "maximum": 0.8})  # no integer in between
    with pytest.raises(BadSchema, match="multipleOf"):
        grammar_text(Params(max_tokens=1, json_schema={"type": "integer", "multipleOf": 3}), GrammarLimits())
