"""The text-to-SQL labelled set and how two results are compared (tests and benchmarks)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LABELLED: list[dict[str, str]] = json.loads(
    (Path(__file__).resolve().parents[1] / "tests" / "services" / "llm" / "data" / "sql_questions.json").read_text()
)
"""Question, reference SQL and database (inventory or shop: baton/demo/databases.py)."""


def same_result(got: list[list[Any]], expected: list[list[Any]], ordered: bool) -> bool:
    """Execution accuracy's test: the same rows (floats to 6 places), in the same order
    only when the reference orders them."""

    def norm(rows: list[list[Any]]) -> list[tuple[Any, ...]]:
        return [tuple(round(v, 6) if isinstance(v, float) and math.isfinite(v) else v for v in row) for row in rows]

    a, b = norm(got), norm(expected)
    return a == b if ordered else sorted(a, key=repr) == sorted(b, key=repr)
