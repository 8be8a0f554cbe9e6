"""The engine's loads, in process, with the bundled SmolLM2 (loads in well under a second)."""

from __future__ import annotations

import threading

from services.llm.engine import Engine, Message, Params
from shared.presets import resolve


def test_an_offloaded_model_asks_nothing_of_the_card_and_a_loaded_one_keeps_llama_cpps_defaults() -> None:
    # Measured on an H100 (README, GPU section): with llama.cpp's defaults a model with 0
    # layers still kept its KV cache and a compute buffer on the card (1272 MiB against
    # 586 MiB for the CUDA context alone) and sent large batches to it without the lease.
    path, _ = resolve("smollm2-135m-instruct", "llm")
    engine = Engine(path, context_size=256, batch_size=64)
    try:
        engine.load(0)
        params = engine.llama.context_params
        assert (params.offload_kqv, params.op_offload) == (False, False)
        engine.load(99)
        params = engine.llama.context_params
        assert (params.offload_kqv, params.op_offload) == (True, True)
        assert engine.gpu_layers == 99
    finally:
        engine.close()


def test_a_conversations_saved_state_starts_its_next_turn_and_changes_nothing_in_the_answer() -> None:
    path, _ = resolve("smollm2-135m-instruct", "llm")
    params = Params(max_tokens=12, temperature=0.0)

    def answer(engine: Engine, messages: list[Message], keep_as: str | None) -> str:
        pieces = engine.generate(engine.prompt(messages), params, threading.Event(), keep_as=keep_as)
        return "".join(p for p in pieces if isinstance(p, str))

    first: list[Message] = [{"role": "user", "content": "My boat is called Blue Heron. Say hi."}]
    other: list[Message] = [{"role": "user", "content": "Name a colour."}]
    with_states = Engine(path, context_size=1024, batch_size=64, prefix_budget_bytes=64 * 1_048_576)
    cold = Engine(path, context_size=1024, batch_size=64)
    try:
        with_states.load(0)
        cold.load(0)
        said = answer(with_states, first, "conv-a")
        answer(with_states, other, "conv-b")  # another conversation takes the context meanwhile
        follow_up = [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "What is my boat?"}]
        resumed = answer(with_states, follow_up, "conv-a")
        assert with_states.prefixes.restored == 1
        assert with_states.prefixes.reused_tokens >= len(with_states.prompt(first).tokens)
        assert resumed == answer(cold, follow_up, None)  # greedy: the same answer, read afresh
        with_states.load(0)  # a reload drops every state
        assert with_states.prefixes.info()["states"] == 0
    finally:
        with_states.close()
        cold.close()


def test_saved_states_stay_within_their_budget_least_recently_used_out() -> None:
    path, _ = resolve("smollm2-135m-instruct", "llm")
    engine = Engine(path, context_size=512, batch_size=64, prefix_budget_bytes=1)

    def turn(key: str) -> None:
        prompt = engine.prompt([{"role": "user", "content": f"Say {key}."}])
        list(engine.generate(prompt, Params(max_tokens=2), threading.Event(), keep_as=key))

    try:
        engine.load(0)
        turn("a")
        assert engine.prefixes.info()["states"] == 0  # larger than the whole budget: not kept
        engine.prefixes.budget_bytes = 64 * 1_048_576
        for key in ("a", "b", "c"):
            turn(key)
        one = engine.prefixes.bytes // 3
        engine.prefixes.budget_bytes = 2 * one + one // 2
        turn("d")
        assert engine.prefixes.info()["states"] == 2 and engine.prefixes.bytes <= engine.prefixes.budget_bytes
    finally:
        engine.close()
