"""Prompt fitting, in process, with the real tokenizer and chat template of the bundled
SmolLM2 (its vocabulary only: no weights are loaded, so this runs in the quick tier)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.llm.chat.prompting import ContextTooLong, fit
from services.llm.engine import Engine, Message
from services.llm.memories import Passage
from shared.presets import resolve

CONTEXT = 512


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    path, _ = resolve("smollm2-135m-instruct", "llm")
    engine = Engine(path, context_size=CONTEXT, batch_size=64)
    yield engine
    engine.close()


def memory(name: str, score: float, words: int = 20) -> Passage:
    return Passage(name, f"{name}: " + " ".join(["harbor"] * words), score, {"source": name})


def turns(count: int, words: int = 12) -> list[Message]:
    said: list[Message] = [{"role": "system", "content": "You are brief."}]
    for i in range(count):
        role = "user" if i % 2 == 0 else "assistant"
        said.append({"role": role, "content": f"turn {i}: " + " ".join(["deadline"] * words)})
    said.append({"role": "user", "content": "What is the deadline?"})
    return said


def test_what_fits_is_kept_whole_and_memories_go_most_relevant_first(engine: Engine) -> None:
    messages = turns(2)
    fitted = fit(engine, messages, [memory("low", 0.1), memory("high", 0.9), memory("mid", 0.5)], max_tokens=32)
    assert fitted.dropped_turns == 0
    assert [p.id for p in fitted.passages] == ["high", "mid", "low"]
    assert len(fitted.prompt.tokens) <= CONTEXT - 32


def test_the_least_relevant_memories_go_first_then_the_oldest_turns(engine: Engine) -> None:
    passages = [memory(f"m{i}", score=i / 10, words=40) for i in range(10)]
    fitted = fit(engine, turns(2), passages, max_tokens=128)
    kept = [p.id for p in fitted.passages]
    assert 0 < len(kept) < 10 and fitted.dropped_turns == 0
    assert kept == [f"m{i}" for i in range(9, 9 - len(kept), -1)]  # the highest scores, in order
    assert len(fitted.prompt.tokens) <= CONTEXT - 128

    history = turns(60)
    fitted = fit(engine, history, [memory("only", 0.9, words=200)], max_tokens=64)
    assert fitted.passages == []  # memories go before any turn does
    assert 0 < fitted.dropped_turns < 60
    assert len(fitted.prompt.tokens) <= CONTEXT - 64


def test_the_system_message_and_the_last_question_always_stay(engine: Engine) -> None:
    history = turns(80)
    fitted = fit(engine, history, [], max_tokens=64)
    kept = engine.prompt(history[:1] + history[1 + fitted.dropped_turns :])
    assert kept.tokens == fitted.prompt.tokens  # exactly the oldest turns were dropped
    assert fitted.dropped_turns < 80


def test_a_last_message_too_long_for_the_context_is_refused(engine: Engine) -> None:
    history: list[Message] = [{"role": "user", "content": " ".join(["deadline"] * 2000)}]
    with pytest.raises(ContextTooLong, match="context is 512 tokens"):
        fit(engine, history, [], max_tokens=16)
    with pytest.raises(ContextTooLong):
        fit(engine, turns(1), [], max_tokens=CONTEXT)  # room for nothing but the answer
