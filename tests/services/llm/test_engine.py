"""The batching engine, in process, with the bundled SmolLM2 (it loads in well under a
second): many sequences in one batch, each with its own sampler and grammar; leaving at
once; taking turns between subjects; reusing prefixes; moving layers mid-stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from harness.samples import WEATHER_TOOL as TOOL
from services.llm.engine import Cancelled, Engine, Finished, Message, Params
from services.llm.engine.model import Model, Shape
from services.llm.sql.check import check
from services.llm.sql.grammar import select_grammar
from services.llm.sql.schema import parse_ddl
from services.llm.sql.service import prompt as sql_prompt
from services.llm.tools.calls import grammar as tools_grammar
from services.llm.tools.calls import parse_calls, parse_tools, with_tools
from shared.presets import resolve

PATH, _ = resolve("smollm2-135m-instruct", "llm")


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    made = Engine(PATH, context_size=4096, parallel=8, prefill_chunk=32, cache_entries=16)
    made.load(0)
    yield made
    made.close()


def ask(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


async def run(engine: Engine, messages: list[Message], params: Params, **options: Any) -> tuple[str, Finished]:
    generation = engine.submit(engine.prompt(messages), params, **options)
    pieces: list[str] = []
    async for item in generation:
        if isinstance(item, Finished):
            return "".join(pieces), item
        pieces.append(item)
    raise AssertionError("no Finished")


def greedy(tokens: int = 24, **extra: Any) -> Params:
    return Params(max_tokens=tokens, temperature=0.0, **extra)


def test_an_offloaded_model_asks_nothing_of_the_card_and_a_loaded_one_keeps_llama_cpps_defaults() -> None:
    # Measured on an H100 (docs/benchmarks.md, Measured on a GPU): with llama.cpp's defaults a model with 0
    # layers still kept its KV cache and a compute buffer on the card and sent large
    # batches to it without the lease.
    for layers, on_card in ((0, False), (99, True)):
        model = Model(PATH, Shape(cells=256, batch=64, sequences=2, threads=1), layers)
        try:
            params = model.context_params
            assert (params.offload_kqv, params.op_offload, params.kv_unified) == (on_card, on_card, True)
        finally:
            model.close()


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
DDL = "CREATE TABLE pets (id INTEGER PRIMARY KEY, name TEXT, kind TEXT, age INTEGER);"


async def test_eight_requests_in_one_batch_each_valid_for_its_own_grammar(engine: Engine) -> None:
    tools = parse_tools([TOOL])
    schema = parse_ddl(DDL)
    call, select = tools_grammar("required", tools, False), select_grammar(schema)
    jobs: list[tuple[str, list[Message], Params]] = [
        ("text", ask("Name a fruit."), greedy()),
        ("text", ask("Say hello."), Params(max_tokens=16, temperature=0.9, seed=7)),
        ("tool", with_tools(ask("What is the weather in Paris?"), tools), greedy(40, grammar=call)),
        ("tool", with_tools(ask("Oslo weather?"), tools), Params(max_tokens=40, temperature=1, seed=3, grammar=call)),
        ("json", ask("A trip: which city, how many days?"), greedy(48, json_schema=SCHEMA)),
        ("json", ask("Plan a short holiday."), Params(max_tokens=48, temperature=1.2, seed=11, json_schema=SCHEMA)),
        ("sql", sql_prompt(schema, "How many pets are cats?"), greedy(60, grammar=select)),
        ("sql", sql_prompt(schema, "Oldest pets?"), Params(max_tokens=60, temperature=1, seed=5, grammar=select)),
    ]  # fmt: skip
    started = engine.scheduler.stats.steps
    results = await asyncio.gather(*(run(engine, messages, params) for _, messages, params in jobs))
    widest = engine.scheduler.stats.steps - started
    assert widest < sum(f.completion_tokens for _, f in results)  # they shared steps: one batch
    for (kind, _, _), (text, finished) in zip(jobs, results, strict=True):
        if kind != "text":  # a grammar's answer is whole: it ends when the grammar does
            assert finished.reason == "stop", (kind, text)
        if kind == "tool":
            calls = parse_calls(text)
            assert calls is not None and calls[0].name == "get_weather", text
            assert isinstance(json.loads(calls[0].arguments)["city"], str)
        elif kind == "json":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "sql":
            assert check(text, schema, "sqlite", 100).sql.startswith("SELECT")
        else:
            assert text.strip()


async def test_greedy_answers_in_a_batch_and_alone(engine: Engine, record_property: Any) -> None:
    """llama.cpp is not batch-invariant (the sums run in another order), so the answers
    may part after a while: the agreement is measured and printed, not asserted equal."""
    questions = [f"Write one sentence about the number {n}." for n in range(8)]
    alone = [await run(engine, ask(q), greedy(32), keep=False) for q in questions]
    together = await asyncio.gather(*(run(engine, ask(q), greedy(32), keep=False) for q in questions))
    same = sum(a[0] == b[0] for a, b in zip(alone, together, strict=True))
    prefix = [len(_common(a[0], b[0])) / max(1, len(a[0])) for a, b in zip(alone, together, strict=True)]
    record_property("measured: greedy answers identical in a batch of 8 and alone", f"{same}/8")
    record_property("measured: their mean common prefix", f"{sum(prefix) / len(prefix):.0%}")
    assert all(b[1].reason in ("stop", "length") for b in together)


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


async def test_a_cancelled_generation_leaves_the_batch_and_frees_its_slot_at_once(engine: Engine) -> None:
    scheduler = engine.scheduler
    generation = engine.submit(engine.prompt(ask("Count to a thousand.")), greedy(2000), keep=False)
    pieces = generation.__aiter__()
    assert isinstance(await pieces.__anext__(), str)
    assert scheduler.running == 1
    generation.cancel()
    scheduler.wake()
    with pytest.raises(Cancelled):
        async for _ in pieces:
            pass
    assert scheduler.running == 0 and scheduler.reserved == 0


async def test_a_second_users_request_is_not_held_back_by_a_first_users_eight(engine: Engine) -> None:
    """Four slots here; the first user asks eight long answers, the second one short one
    just after. The second one's first token comes before the first user's last streams
    even start."""
    small = Engine(PATH, context_size=4096, parallel=4, prefill_chunk=32)
    small.load(0)
    try:
        firsts: dict[str, float] = {}
        starts: list[float] = []

        async def streamed(subject: str, name: str, tokens: int) -> None:
            generation = small.submit(
                small.prompt(ask(f"Tell a long story about {name}.")), greedy(tokens), subject=subject
            )
            async for item in generation:
                if isinstance(item, str) and name not in firsts:
                    firsts[name] = time.monotonic()
                    starts.append(firsts[name])

        first_user = [asyncio.create_task(streamed("alice", f"dragon {i}", 64)) for i in range(8)]
        await asyncio.sleep(0)
        second = asyncio.create_task(streamed("bob", "a cat", 8))
        await asyncio.gather(second, *first_user)
        order = sorted(firsts, key=firsts.__getitem__)
        assert order.index("a cat") <= 4, order  # in the first turn after the slots free up
        assert firsts["a cat"] < max(firsts[f"dragon {i}"] for i in range(8))
    finally:
        small.close()


async def test_a_conversations_next_turn_starts_from_its_cells_and_changes_nothing(engine: Engine) -> None:
    first: list[Message] = ask("My boat is called Blue Heron. Say hi.")
    said, _ = await run(engine, first, greedy(12), subject="ada")
    follow_up = [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "What is my boat?"}]
    reused_before = engine.scheduler.cache.reused_tokens
    answer, finished = await run(engine, follow_up, greedy(12), subject="ada", keep=False)
    assert finished.reused_tokens >= len(engine.prompt(first).tokens) - 2
    assert engine.scheduler.cache.reused_tokens > reused_before
    cold = Engine(PATH, context_size=4096, parallel=1, cache_entries=0)
    cold.load(0)
    try:
        again, fresh = await run(cold, follow_up, greedy(12), keep=False)
    finally:
        cold.close()
    assert fresh.reused_tokens == 0
    assert answer == again  # greedy: the same answer, read afresh


async def test_a_turn_longer_than_half_the_context_still_starts_from_its_cells() -> None:
    """The cells a request shares with its cache entry exist once: counting them twice
    evicted the entry a long conversation's next turn was about to reuse."""
    small = Engine(PATH, context_size=1024, parallel=2, prefill_chunk=32, cache_entries=4)
    small.load(0)
    try:
        first: list[Message] = ask("Remember these numbers: " + ", ".join(str(n) for n in range(100, 260)) + ".")
        assert len(small.prompt(first).tokens) > small.n_ctx // 2
        said, _ = await run(small, first, greedy(8), subject="ada")
        follow_up = [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "The first?"}]
        _, finished = await run(small, follow_up, greedy(8), subject="ada", keep=False)
        assert finished.reused_tokens >= len(small.prompt(first).tokens) - 2
    finally:
        small.close()


async def test_another_subject_reuses_only_what_the_service_wrote(engine: Engine) -> None:
    secret = ask("My locker code is 4417. Remember it.")
    await run(engine, secret, greedy(4), subject="mallory-target")
    _, other = await run(engine, secret, greedy(4), subject="mallory", keep=False)
    assert other.reused_tokens == 0  # the same words from someone else: read afresh
    shared = sql_prompt(None, "")
    public = len(engine.prompt(shared).tokens) - 8
    asked = sql_prompt(parse_ddl(DDL), "How many pets?")
    await run(engine, asked, greedy(4), subject="carol", public_prefix=public)
    _, dave = await run(
        engine, sql_prompt(parse_ddl(DDL), "Which pets are old?"), greedy(4), subject="dave", keep=False
    )
    assert 0 < dave.reused_tokens <= public  # the instructions and examples, no further


async def test_stop_strings_max_tokens_and_the_time_budget(engine: Engine) -> None:
    whole, _ = await run(engine, ask("Count from 1 to 10."), greedy(40), keep=False)
    assert "3" in whole
    text, finished = await run(engine, ask("Count from 1 to 10."), greedy(40, stop=["3"]), keep=False)
    assert text == whole[: whole.index("3")] and finished.reason == "stop"
    text, finished = await run(engine, ask("Tell me a long story."), greedy(9), keep=False)
    assert finished.reason == "length" and finished.completion_tokens == 9  # usage counts every token
    budgeted = Engine(PATH, context_size=1024, parallel=1, budget_s=0.3)
    budgeted.load(0)
    try:
        _, cut = await run(budgeted, ask("Write a very long essay about the sea."), greedy(900), keep=False)
    finally:
        budgeted.close()
    assert cut.reason == "length" and cut.cut == "deadline" and cut.completion_tokens < 900


async def test_penalties_change_a_repetitive_answer(engine: Engine) -> None:
    # The summaries ask for repeat_penalty and users for frequency/presence penalties; each
    # goes through llama.cpp's penalties sampler, whose signature changed between releases.
    prompt = ask("Repeat after me: la la la la la la la la la la la la")
    plain, _ = await run(engine, prompt, greedy(24), keep=False)
    for extra in ({"repeat_penalty": 1.5}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized, finished = await run(engine, prompt, greedy(24, **extra), keep=False)
        assert finished.completion_tokens > 0
        assert penalized != plain, extra


async def test_a_request_whose_sampler_fails_is_answered_with_the_error_and_the_batch_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.llm.engine import batch

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("a binding that changed")

    monkeypatch.setattr(batch, "Sampler", broken)
    with pytest.raises(RuntimeError, match="the model failed"):
        await asyncio.wait_for(run(engine, ask("Hello"), greedy(4), keep=False), 30)
    monkeypatch.undo()
    _, finished = await run(engine, ask("Hello"), greedy(4), keep=False)
    assert finished.completion_tokens == 4 and engine.scheduler.running == 0


async def test_a_stream_survives_a_reload_mid_answer_unchanged(engine: Engine) -> None:
    """The layers move (here: the CPU build reloads with 0 layers) in the middle of an
    answer: the stream goes on from its cells, and greedy text is unchanged."""
    question = ask("Describe the colour red in two sentences.")
    reference, _ = await run(engine, question, greedy(40), keep=False)
    generation = engine.submit(engine.prompt(question), greedy(40), keep=False)
    pieces: list[str] = []
    scheduler = engine.scheduler
    async for item in generation:
        if isinstance(item, Finished):
            break
        pieces.append(item)
        if len(pieces) == 10:
            await asyncio.to_thread(scheduler.hold)
            await asyncio.to_thread(engine.load, 0)
            scheduler.open()
    assert "".join(pieces) == reference


async def test_four_streams_survive_a_reload_and_none_starts_over(engine: Engine) -> None:
    questions = [ask(f"Describe the colour {c} in one sentence.") for c in ("red", "blue", "green", "yellow")]
    scheduler = engine.scheduler
    read_before = scheduler.stats.prefilled_tokens
    generations = [engine.submit(engine.prompt(q), greedy(24), keep=False) for q in questions]
    collected: list[list[str]] = [[] for _ in questions]
    endings: list[Finished] = []

    async def collect(i: int) -> None:
        async for item in generations[i]:
            if isinstance(item, Finished):
                endings.append(item)
            else:
                collected[i].append(item)

    tasks = [asyncio.create_task(collect(i)) for i in range(4)]
    while sum(len(c) for c in collected) < 12:
        await asyncio.sleep(0.005)
    await asyncio.to_thread(scheduler.hold)
    await asyncio.to_thread(engine.load, 0)
    scheduler.open()
    await asyncio.gather(*tasks)
    assert len(endings) == 4 and all(c for c in collected)
    # Every prompt was read once: the reload carried the cells, nobody was read again.
    assert scheduler.stats.prefilled_tokens - read_before == sum(len(engine.prompt(q).tokens) for q in questions)


async def test_a_dear_grammar_is_sampled_beside_the_batch_and_stays_valid() -> None:
    """With a step budget of 0 ms every grammar is 'dear': its tokens are sampled on the
    side thread while the free-text streams go on decoding, and its answer stays valid."""
    aside = Engine(PATH, context_size=4096, parallel=4, prefill_chunk=32, grammar_step_ms=0.0)
    aside.load(0)
    try:
        free = [run(aside, ask(f"Tell me about {t}."), greedy(24), keep=False) for t in ("cats", "rain", "boats")]
        constrained = run(aside, ask("A trip: which city, how many days?"), greedy(48, json_schema=SCHEMA), keep=False)
        results = await asyncio.gather(constrained, *free)
        jsonschema.validate(json.loads(results[0][0]), SCHEMA)
        assert aside.scheduler.stats.aside > 0
        assert all(text for text, _ in results[1:])
    finally:
        aside.close()
