"""Grammars that cannot crash or stall llama.cpp: each gate refuses what it should,
naming the field, and lets ordinary schemas through. In-process, on the bundled model's
vocabulary (loaded alone, without weights)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import llama_cpp
import pytest

from services.llm.engine import BadSchema, Params, grammar_text
from services.llm.engine.grammar import GrammarGuard, GrammarLimits, GrammarRefused, check_schema, nesting
from services.llm.sql.grammar import focused, select_grammar, spelled
from services.llm.sql.schema import parse_ddl
from services.llm.tools.calls import BadTool, calls_schema, grammar, parse_tools
from services.llm.tools.schema_grammar import gbnf
from shared.presets import resolve

LIMITS = GrammarLimits()
BOMB = {"type": "object", "properties": {"a": {"type": "string", "minLength": 100000, "maxLength": 200000}}}
"""The red team's schema: llama.cpp's parser segfaulted on it (exit -11), three times."""


@pytest.fixture(scope="module")
def guard() -> Iterator[GrammarGuard]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(resolve("smollm2-135m-instruct", "llm")[0]).encode(), params)
    assert model
    yield GrammarGuard(llama_cpp.llama_model_get_vocab(model), LIMITS)
    llama_cpp.llama_model_free(model)


def wide_ddl(tables: int = 8, columns: int = 64) -> str:
    """The red team's text-to-SQL schema: 8 tables of 64 columns, each keyed to the one before."""
    ddl = []
    for t in range(tables):
        cols = ["id INTEGER PRIMARY KEY", *(f"c{j} TEXT" for j in range(columns - 2))]
        if t:
            cols.append(f"t{t - 1}_id INTEGER REFERENCES t{t - 1}(id)")
        ddl.append(f"CREATE TABLE t{t} ({', '.join(cols)});")
    return "\n".join(ddl)


def test_the_red_teams_schema_is_refused_before_llama_cpp_sees_it() -> None:
    with pytest.raises(BadSchema) as refused:
        grammar_text(Params(max_tokens=8, json_schema=BOMB), LIMITS)
    assert refused.value.param == "response_format.json_schema.schema.properties.a.minLength"
    assert "at most 1000" in str(refused.value)


def test_the_same_schema_in_a_tool_is_refused_naming_the_tool() -> None:
    tool = {"type": "function", "function": {"name": "save", "parameters": BOMB}}
    with pytest.raises(BadTool) as refused:
        parse_tools([tool], LIMITS)
    assert refused.value.param == "tools[0].function.parameters.properties.a.minLength"


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"type": "array", "items": {"type": "integer"}, "maxItems": 5000}, "maxItems"),
        ({"type": "string", "pattern": "^[a-z]{1,50000}$"}, "pattern"),
        ({"type": "integer", "minimum": -1e300}, "minimum"),
        ({"type": "string", "maxLength": -3}, "maxLength"),
        ({"type": "string", "maxLength": True}, "maxLength"),
        ({"$ref": "https://example.com/schema.json"}, "$ref"),
        ({"type": "string", "enum": [f"v{i}" for i in range(5000)]}, None),
    ],
)
def test_each_bound_of_the_schema_names_its_field(schema: dict[str, Any], param: str | None) -> None:
    with pytest.raises(GrammarRefused) as refused:
        check_schema(schema, LIMITS, "s")
    assert refused.value.param == (f"s.{param}" if param else "s")


def test_a_schema_nested_past_the_bound_is_refused_where_it_goes_too_deep() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"x": schema}}
    with pytest.raises(GrammarRefused) as refused:
        check_schema(schema, LIMITS, "s")
    assert refused.value.param is not None and refused.value.param.startswith("s.properties.x")
    assert "deeper than 32" in str(refused.value)


def test_ordinary_schemas_pass_every_gate(guard: GrammarGuard) -> None:
    schemas: list[dict[str, Any]] = [
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 1000}}, "required": ["name"]},
        {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7}, "minItems": 1, "maxItems": 100},
        {"type": "object", "properties": {"when": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}}},
    ]
    for schema in schemas:
        check_schema(schema, LIMITS)
        cost = guard.check(gbnf(schema), "s")
        assert cost.steps >= 1 and cost.step_ms < guard.max_step_ms


def test_a_grammar_nested_past_the_parsers_reach_is_refused_unparsed(guard: GrammarGuard) -> None:
    deep = "root ::= " + "(" * 5000 + '"a"' + ")" * 5000
    assert nesting(deep) == 5000
    with pytest.raises(GrammarRefused, match="nested 5000 deep"):
        guard.check(deep, "tools")
    assert nesting('root ::= "(((" [(] x\n# (((\nx ::= ("a")') == 1


def test_a_grammar_llama_cpp_refuses_is_a_refusal_not_a_crash(guard: GrammarGuard) -> None:
    with pytest.raises(GrammarRefused, match=r"llama\.cpp refused"):
        guard.check("root ::= [a-z", "schema")


def test_the_wide_sql_schema_is_narrowed_to_what_the_question_names(guard: GrammarGuard) -> None:
    schema = parse_ddl(wide_ddl())
    assert spelled(schema) > 5000
    with pytest.raises(GrammarRefused, match="too dear"):  # its whole grammar: 0.9 s a token here
        guard.check(select_grammar(schema), "schema")
    narrow = focused(schema, "How many rows of t3 have c5 empty?", 400)
    assert "t3" in narrow.tables and spelled(narrow) <= 400
    assert guard.check(select_grammar(narrow), "schema").steps >= 1


def test_a_small_schema_is_not_narrowed() -> None:
    schema = parse_ddl(wide_ddl(3, 8))
    assert focused(schema, "anything", 400) is schema


def test_a_tool_with_defs_and_refs_makes_a_grammar_that_llama_cpp_takes(guard: GrammarGuard) -> None:
    """The red team's 500: the same parameters worked in response_format, not in tools."""
    parameters = {
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    }
    tools = parse_tools([{"type": "function", "function": {"name": "line", "parameters": parameters}}], LIMITS)
    text = grammar("required", tools, parallel=False)
    assert text is not None and "point" in text
    guard.check(text, "tools")
    schema = calls_schema(tools, parallel=False)
    assert schema["$defs"]["tool0"]["properties"]["start"] == {"$ref": "#/$defs/tool0/$defs/point"}
    assert json.dumps(parameters) in json.dumps(tools[0].parameters)  # the tool itself is untouched


def test_a_recursive_tool_schema_works_too(guard: GrammarGuard) -> None:
    tree = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
    }
    tools = parse_tools([{"type": "function", "function": {"name": "tree", "parameters": tree}}], LIMITS)
    text = grammar("auto", tools, parallel=True)
    assert text is not None
    guard.check(text, "tools")
