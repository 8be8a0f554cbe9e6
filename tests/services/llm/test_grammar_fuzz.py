"""The grammar fuzz: a few hundred grammar bombs through the gates and, when they pass,
through the real llama.cpp, in a child process that must never die."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.servers import REPO_ROOT

pytestmark = pytest.mark.slow

BARE = """
import llama_cpp
from services.llm.tools.schema_grammar import gbnf
from shared.presets import resolve
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = llama_cpp.llama_model_load_from_file(str(resolve("smollm2-135m-instruct", "llm")[0]).encode(), params)
bomb = {"type": "object", "properties": {"a": {"type": "string", "minLength": 100000, "maxLength": 200000}}}
llama_cpp.llama_sampler_init_grammar(llama_cpp.llama_model_get_vocab(model), gbnf(bomb).encode(), b"root")
"""


def test_without_the_gates_llama_cpp_dies_of_the_red_teams_schema() -> None:
    """Why the gates exist: the schema's grammar, given to llama.cpp as it is, kills the process."""
    done = subprocess.run([sys.executable, "-c", BARE], cwd=REPO_ROOT, capture_output=True, timeout=300, check=False)
    assert done.returncode < 0, done.returncode  # killed by a signal (SIGSEGV: -11)


SHARDS = 2
"""Child processes the bombs are dealt to (each bomb in one; the runner is single-threaded)."""


def test_three_hundred_grammar_bombs_never_kill_the_process(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    logs = [(tmp_path / f"{shard}.out", tmp_path / f"{shard}.err") for shard in range(SHARDS)]
    children = []
    for shard, (out, err) in enumerate(logs):
        with out.open("w") as stdout, err.open("w") as stderr:  # files: a full pipe would stall a child
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "harness.grammar_fuzz", "300", "2026", f"{shard}/{SHARDS}"],
                    cwd=REPO_ROOT,
                    stdout=stdout,
                    stderr=stderr,
                )
            )
    outcomes: Counter[str] = Counter()
    results = []
    for child, (out, err) in zip(children, logs, strict=True):
        returncode = child.wait(timeout=580)
        assert returncode == 0, (returncode, err.read_text(errors="replace")[-2000:])
        results.append(json.loads(out.read_text().strip().splitlines()[-1]))
        outcomes.update(results[-1]["outcomes"])
    assert sum(outcomes.values()) == 300
    # Both sides were exercised: bombs refused, and grammars llama.cpp really sampled with.
    assert outcomes.get("accepted and sampled", 0) >= 50
    assert outcomes.get("refused by the schema gate", 0) >= 50
    assert outcomes.get("refused by llama.cpp's gates", 0) >= 10
    record_property("measured: grammar fuzz", json.dumps({"outcomes": dict(outcomes), "shards": results}))
