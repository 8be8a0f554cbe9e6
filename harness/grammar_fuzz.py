"""Grammar bombs: random JSON schemas and GBNF texts built to crash or stall llama.cpp,
and a runner that sends each through the service's gates and, when they pass, through
the real model.

``python -m harness.grammar_fuzz COUNT SEED [SHARD/SHARDS]`` runs COUNT of them in this
process (with SHARD/SHARDS, the ones whose index is SHARD modulo SHARDS: the same bombs
over several processes) and prints one JSON line of what happened; it must exit 0 (a
segfault is exit -11). The test (tests/services/llm/test_grammar_fuzz.py) runs it in
child processes for that reason.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from typing import Any

BIG = (0, 1, 7, 100, 999, 1000, 1001, 5000, 20000, 100000, 200000)


TAME = (0, 1, 3, 7, 20, 100, 500, 999, 1000)


def _count(rng: random.Random, tame: bool) -> int:
    if tame:
        return rng.choice(TAME) // 2
    return rng.choice(BIG) if rng.random() < 0.6 else rng.randrange(0, 3000)


def schema(rng: random.Random, depth: int = 0, tame: bool = False) -> dict[str, Any]:
    """One random subschema, biased towards what hurts: long strings, long arrays, deep
    nesting, wide unions, big enums, wild bounds and patterns, references."""
    kinds = ["string", "integer", "number", "array", "object", "enum", "anyOf", "ref", "pattern"]
    if tame:
        kinds = kinds[:-2]
    kind = rng.choice(kinds if depth < (4 if tame else 45) else kinds[:3])
    if kind == "string":
        node: dict[str, Any] = {"type": "string"}
        if rng.random() < 0.7:
            low = _count(rng, tame)
            node["minLength"] = low
            node["maxLength"] = low + _count(rng, tame)
        return node
    if kind in ("integer", "number"):
        node = {"type": kind}
        for key in rng.sample(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"], rng.randrange(0, 3)):
            node[key] = rng.choice([0, -5, 7, 10**6, -(10**15), 3.5] if tame else [0, -5, 10**17, 1e300, 3.5])
        return node
    if kind == "array":
        node = {"type": "array", "items": schema(rng, depth + 1, tame)}
        if rng.random() < 0.7:
            low = _count(rng, tame)
            node["minItems"] = low
            node["maxItems"] = low + _count(rng, tame)
        return node
    if kind == "object":
        width = rng.choice([1, 2, 5] if tame else [1, 2, 5, 30, 300])
        properties = {f"p{i}": schema(rng, depth + 1, tame) for i in range(width if depth < 3 else min(width, 3))}
        return {"type": "object", "properties": properties, "required": list(properties)[: rng.randrange(0, 4)]}
    if kind == "enum":
        return {"enum": [f"value-{i}" for i in range(rng.choice([1, 10, 100] if tame else [1, 10, 1000, 6000]))]}
    if kind == "anyOf":
        return {"anyOf": [schema(rng, depth + 1, tame) for _ in range(rng.choice([2, 5, 40]) if depth < 3 else 2)]}
    if kind == "ref":
        return {"$ref": rng.choice(["#", "#/$defs/x", "#/$defs/missing", "https://example.com/s.json"])}
    repeat = rng.choice([3, 100, 5000, 100000])
    return {"type": "string", "pattern": rng.choice([f"^a{{{repeat}}}$", f"^(a|b){{1,{repeat}}}$", "^" + "(" * 80])}


def document(rng: random.Random) -> dict[str, Any]:
    """Half of them tame (what passes the gates, so that llama.cpp runs them), half wild."""
    tame = rng.random() < 0.5
    root = {"type": "object", "properties": {"a": schema(rng, 0, tame), "b": schema(rng, 0, tame)}}
    if rng.random() < 0.3:
        root["$defs"] = {"x": schema(rng, 0, tame)}
    deep: dict[str, Any] = root
    for _ in range(rng.choice([0, 5] if tame else [0, 0, 10, 40, 200])):  # deep nesting on top
        deep = {"type": "object", "properties": {"n": deep}}
    return deep


def gbnf_bomb(rng: random.Random) -> str:
    """GBNF text as a request never makes it, for the text gates."""
    n = rng.choice([10, 1000, 5000, 30000])
    return rng.choice(
        [
            "root ::= " + "(" * n + '"a"' + ")" * n,
            "root ::= " + " | ".join(f'"w{i}"' for i in range(n)),
            "\n".join(f"r{i} ::= r{i + 1}" for i in range(n)) + f'\nr{n} ::= "x"\nroot ::= r0',
            'root ::= "a"{' + str(n) + "}",
            "root ::= [a-z",
        ]
    )


def run(count: int, seed: int, shard: int = 0, shards: int = 1) -> dict[str, Any]:
    import llama_cpp

    from services.llm.engine import BadSchema, Params, grammar_text
    from services.llm.engine.grammar import GrammarGuard, GrammarLimits, GrammarRefused, route_llama_logs
    from shared.presets import resolve

    route_llama_logs()
    path, _ = resolve("smollm2-135m-instruct", "llm")
    limits = GrammarLimits()
    llama = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)
    guard = GrammarGuard(llama._model.vocab, limits)
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    dearest_ms = 0.0
    started = time.monotonic()
    for index in range(count):
        # Every bomb is drawn, in every shard, so that each index is the same bomb.
        bomb: str | dict[str, Any] = gbnf_bomb(rng) if index % 5 == 4 else document(rng)
        if index % shards != shard:
            continue
        if isinstance(bomb, str):
            text, param = bomb, "tools"
        else:
            try:
                found = grammar_text(Params(max_tokens=4, json_schema=bomb), limits)
            except BadSchema:
                outcomes["refused by the schema gate"] += 1
                continue
            assert found is not None
            text, param = found
        try:
            cost = guard.check(text, param)
        except GrammarRefused:
            outcomes["refused by llama.cpp's gates"] += 1
            continue
        dearest_ms = max(dearest_ms, cost.step_ms)
        grammar = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
        llama.create_completion("Answer in JSON:", max_tokens=4, temperature=0.0, grammar=grammar)
        outcomes["accepted and sampled"] += 1
    return {
        "count": count,
        "outcomes": dict(outcomes),
        "dearest_step_ms": round(dearest_ms, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    count, seed = int(sys.argv[1]), int(sys.argv[2])
    shard, shards = (int(n) for n in (sys.argv[3] if len(sys.argv) > 3 else "0/1").split("/"))
    print(json.dumps(run(count, seed, shard, shards)))


if __name__ == "__main__":
    main()
