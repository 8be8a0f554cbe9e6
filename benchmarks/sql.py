"""Text-to-SQL quality of each bundled model on the labelled set, in process, one run.

    .venv/bin/python -m benchmarks.sql [--models smollm2-135m-instruct gemma-3-270m]

The service's own prompt and grammar (services/llm/sql), greedy decoding, over the two
example databases (baton/demo/databases.py) and the 44 questions of
tests/services/llm/data/sql_questions.json. Validity: the statement passes the checks
(one SELECT over real tables and columns). Execution accuracy: its rows are the
reference query's (harness/sql.py). The model that scores better is the one to
run; the service's tests use the default, SmolLM2.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from baton.demo.databases import build
from benchmarks.support import save, table
from harness.sql import LABELLED, same_result
from services.llm.engine import Engine, Finished, Params, Prompt
from services.llm.sql.check import Refused, check
from services.llm.sql.databases import QueryFailed, SqliteDatabase
from services.llm.sql.grammar import select_grammar
from services.llm.sql.service import prompt
from shared.presets import resolve


async def answer(engine: Engine, asked: Prompt, params: Params) -> str:
    return "".join([p async for p in engine.submit(asked, params, keep=False) if not isinstance(p, Finished)])


def score(model: str, databases: dict[str, SqliteDatabase]) -> dict[str, Any]:
    path, preset = resolve(model, "llm")
    engine = Engine(
        path, context_size=4096, batch_size=512, threads=None, chat_format=preset.chat_format if preset else None
    )
    engine.load(0)
    valid = right = 0
    started = time.monotonic()
    try:
        for case in LABELLED:
            database = databases[case["database"]]
            schema = database.schema()
            params = Params(max_tokens=256, temperature=0.0, grammar=select_grammar(schema))
            text = asyncio.run(answer(engine, engine.prompt(prompt(schema, case["question"])), params))
            try:
                checked = check(text, schema, "sqlite", 1000)
            except Refused:
                continue
            valid += 1
            expected = database.run(check(case["sql"], schema, "sqlite", 1000).sql, 1000, 10).rows
            try:
                got = database.run(checked.sql, 1000, 10).rows
            except QueryFailed:
                continue
            right += same_result(got, expected, ordered=" ORDER BY " in case["sql"])
    finally:
        engine.close()
    return {"valid": valid, "right": right, "questions": len(LABELLED), "seconds": round(time.monotonic() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        databases = {name: SqliteDatabase(name, file) for name, file in build(Path(tmp)).items()}
        results = {model: score(model, databases) for model in args.models}
    rows = [["model", "validity", "execution accuracy", "time"]]
    for model, r in results.items():
        n = r["questions"]
        rows.append(
            [model, f"{r['valid']}/{n}", f"{r['right']}/{n} ({100 * r['right'] / n:.0f}%)", f"{r['seconds']} s"]
        )
    print(table(rows))
    print(f"results: {save('sql', results)}")


if __name__ == "__main__":
    main()
