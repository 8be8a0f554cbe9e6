"""The grammar fuzz: a few hundred grammar bombs through the gates and, when they pass,
through the real llama.cpp, in a child process that must never die."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

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


def test_three_hundred_grammar_bombs_never_kill_the_process(record_property: Callable[[str, object], None]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "harness.grammar_fuzz", "300", "2026"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 300
    # Both sides were exercised: bombs refused, and grammars llama.cpp really sampled with.
    assert outcomes.get("accepted and sampled", 0) >= 50
    assert outcomes.get("refused by the schema gate", 0) >= 50
    assert outcomes.get("refused by llama.cpp's gates", 0) >= 10
    record_property("measured: grammar fuzz", json.dumps(result))
