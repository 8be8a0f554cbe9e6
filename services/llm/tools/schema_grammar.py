"""JSON schemas as llama.cpp grammars, with the numeric bounds llama-cpp-python leaves out.

llama-cpp-python's converter ignores ``minimum``, ``maximum`` and their exclusive forms,
so a model it constrains may write ``"days": 12`` for ``{"type": "integer", "maximum": 7}``
(SmolLM2 did, on tests/services/llm/data/tool_prompts.json). Here a bounded integer is a
rule that spells exactly the integers in its range, and a bounded number one that spells
those integers and the decimals whose integral part keeps them inside (a subset of the
valid numbers when a bound is not an integer, never a value outside them).

Keywords that no grammar here enforces (``multipleOf``, ``uniqueItems``, ``not`` ...) are
refused by ``gbnf`` (Unenforceable, naming where), so that a schema is never promised
and then broken by the output.
"""

from __future__ import annotations

import json
import math
from typing import Any

from llama_cpp import llama_grammar

UNENFORCED = frozenset(
    {
        "multipleOf",
        "uniqueItems",
        "not",
        "minProperties",
        "maxProperties",
        "contains",
        "minContains",
        "maxContains",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_DIGITS = 16
"""Digits of an integral or decimal part, as llama-cpp-python's own number rule allows."""


class Unenforceable(ValueError):
    """A schema keyword the grammar cannot hold the output to; ``where`` is its JSON path."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


def gbnf(schema: dict[str, Any]) -> str:
    """The grammar of JSON values that validate against ``schema``.

    Raises Unenforceable for a keyword it cannot enforce, and whatever llama-cpp-python's
    converter raises (anything from KeyError to RecursionError) for a schema it cannot read.
    """
    check_enforceable(schema)
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    document = json.loads(json.dumps(schema))
    if any(node.get("$ref") == "#" for node in _nodes(document)):
        # The converter resolves only "#/..." references: a schema that refers to itself
        # as a whole becomes a definition of its own document.
        document = {"$defs": {"self": rebased(document, "#/$defs/self")}, "anyOf": [{"$ref": "#/$defs/self"}]}
    resolved = converter.resolve_refs(document, "stdin")
    converter.visit(resolved, "")
    return str(converter.format_grammar())


def rebased(schema: Any, base: str) -> Any:
    """``schema`` with every reference inside it (``#...``) made relative to ``base``, the
    place it is put in a larger document: a tool's ``#/$defs/point`` becomes
    ``#/$defs/tool0/$defs/point`` once its parameters sit at ``#/$defs/tool0``."""
    if isinstance(schema, list):
        return [rebased(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: rebased(value, base) for key, value in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = base + ref[1:]
    return out


def _nodes(schema: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            found.append(node)
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
    return found


def check_enforceable(schema: Any, where: str = "") -> None:
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            check_enforceable(item, f"{where}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    for key in UNENFORCED & schema.keys():
        raise Unenforceable(f"'{key}' cannot be enforced while decoding", where)
    for key in ("items", "additionalProperties", "prefixItems", "anyOf", "oneOf", "allOf"):
        if key in schema:
            check_enforceable(schema[key], f"{where}.{key}")
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            check_enforceable(sub, f"{where}.{key}.{name}")


class _Converter(llama_grammar.SchemaConverter):
    def visit(self, schema: dict[str, Any], name: str) -> str:
        kind = schema.get("type")
        if isinstance(kind, list) and any(b in schema for b in BOUNDS):
            # The base class turns a list of types into bare {"type": t}: keep the bounds.
            each = [self.visit({**schema, "type": t}, f"{name}-{t}") for t in kind]
            return str(self._add_rule(name or "root", " | ".join(each)))
        if kind in ("integer", "number") and any(b in schema for b in BOUNDS) and not {"enum", "const"} & schema.keys():
            low, high = integer_bounds(schema)
            if low is not None and high is not None and low > high:
                raise Unenforceable("bounds with no integer between them cannot be enforced while decoding", "")
            body = integer_rule(low, high)
            if kind == "number":
                body = " | ".join([f"({body})", *decimal_rules(low, high)])
            return str(self._add_rule(name or "root", f"({body}) space"))
        return str(super().visit(schema, name))


def integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The least and greatest integers the bounds allow (None: unbounded)."""
    lows: list[int] = []
    highs: list[int] = []
    if isinstance(schema.get("minimum"), int | float):
        lows.append(math.ceil(schema["minimum"]))
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        lows.append(math.floor(schema["exclusiveMinimum"]) + 1)
    if isinstance(schema.get("maximum"), int | float):
        highs.append(math.floor(schema["maximum"]))
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        highs.append(math.ceil(schema["exclusiveMaximum"]) - 1)
    return (max(lows) if lows else None, min(highs) if highs else None)


def integer_rule(low: int | None, high: int | None) -> str:
    """GBNF for the integers in [low, high], written as JSON writes them."""
    alternatives = []
    if high is None or high >= 0:
        alternatives += magnitudes(max(low, 0) if low is not None else 0, high)
    if low is None or low < 0:
        least = max(1, -high) if high is not None else 1
        alternatives += [f'"-" {m}' for m in magnitudes(least, -low if low is not None else None)]
    return " | ".join(alternatives)


def decimal_rules(low: int | None, high: int | None) -> list[str]:
    """Decimals (with a fraction) that stay in [low, high]: ``i.f`` lies in [i, i + 1)."""
    fraction = f'"." [0-9]{{1,{MAX_DIGITS}}}'
    rules = []
    top = high - 1 if high is not None else None
    start = max(low, 0) if low is not None else 0
    if top is None or start <= top:
        rules += [f"{m} {fraction}" for m in magnitudes(start, top)]
    # -k.f lies in (-(k + 1), -k]: it needs k + 1 <= -low and -k <= high.
    deepest = -low - 1 if low is not None else None
    least = max(0, -high) if high is not None else 0
    if deepest is None or least <= deepest:
        rules += [f'"-" {m} {fraction}' for m in magnitudes(least, deepest)]
    return rules


def magnitudes(low: int, high: int | None) -> list[str]:
    """GBNF sequences spelling each non-negative integer in [low, high] once, without
    leading zeros (high None: up to MAX_DIGITS digits)."""
    if high is not None and low > high:
        return []
    if high is None:
        width = len(str(low))
        longer = f"[1-9] [0-9]{{{width},{MAX_DIGITS - 1}}}" if width < MAX_DIGITS else None
        return magnitudes(low, 10**width - 1) + ([longer] if longer else [])
    return [_spell(a, b) for a, b in _aligned(low, high)]


def _aligned(low: int, high: int) -> list[tuple[int, int]]:
    """[low, high] cut into ranges whose ends share all digits but a run of trailing ones
    that go from 0 to 9, e.g. [7, 123] -> [7, 9], [10, 99], [100, 119], [120, 123]."""
    stops = {high}
    nines = 1
    stop = int(str(low)[:-nines] + "9" * nines)
    while low <= stop < high:
        stops.add(stop)
        nines += 1
        stop = int(str(low)[:-nines] + "9" * nines)
    zeros = 1
    stop = (high + 1) - (high + 1) % 10**zeros - 1
    while low < stop <= high:
        stops.add(stop)
        zeros += 1
        stop = (high + 1) - (high + 1) % 10**zeros - 1
    ranges = []
    start = low
    for stop in sorted(stops):
        ranges.append((start, stop))
        start = stop + 1
    return ranges


def _spell(low: int, high: int) -> str:
    a, b = str(low), str(high)
    return " ".join(f'"{x}"' if x == y else f"[{x}-{y}]" for x, y in zip(a, b, strict=True))
