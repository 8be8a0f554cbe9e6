"""Put memories into the conversation, and make the whole fit the context window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.llm.engine import Engine, Message, Prompt, into_system
from services.llm.memories import Passage

# The shape that even SmolLM2-135M follows (measured: passages first, then one plain
# instruction; labels in parentheses beside the text confused it).
INSTRUCTION = "Answer the question using the context above."


class ContextTooLong(Exception):
    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"this model's context is {n_ctx} tokens; the messages take {prompt_tokens} and max_tokens asks "
            f"for {max_tokens} more. Shorten the messages or lower max_tokens."
        )


@dataclass
class Fitted:
    prompt: Prompt
    passages: list[Passage]
    dropped_turns: int


def with_memories(messages: Sequence[Message], passages: Sequence[Passage]) -> list[Message]:
    """Memories go into the (first) system message: every chat template accepts one there."""
    if not passages:
        return list(messages)
    numbered = (f"[{i}] {p.text}\n(source: {p.label()})" for i, p in enumerate(passages, start=1))
    return into_system(messages, "Context:\n" + "\n".join(numbered) + "\n\n" + INSTRUCTION)


TURN_OVERHEAD = 8
"""Tokens a turn adds besides its text (role markers) in the templates used here, or
more: an estimate, checked by rendering."""


def fit(engine: Engine, messages: Sequence[Message], passages: Sequence[Passage], max_tokens: int) -> Fitted:
    """Drop the least relevant passages first, then the oldest turns, until prompt +
    max_tokens fits; ContextTooLong if the system messages and the last message alone
    do not.

    Linear in the number of messages: each message and passage is tokenized once, the
    drops are decided by summing those counts, and the prompt is rendered once per round
    (a round only repeats when the estimate was short, each time with the true count).
    """
    budget = engine.n_ctx - max_tokens
    kept = sorted(passages, key=lambda p: p.score, reverse=True)
    turns = list(messages)
    prompt = engine.prompt(with_memories(turns, kept))
    if len(prompt.tokens) <= budget:
        return Fitted(prompt, kept, 0)
    passage_cost = [engine.count(p.text) + TURN_OVERHEAD for p in kept]
    droppable = [i for i, m in enumerate(turns[:-1]) if m["role"] != "system"]  # oldest first
    turn_cost = {i: engine.count(turns[i]["content"]) + TURN_OVERHEAD for i in droppable}
    dropped: set[int] = set()
    total = len(prompt.tokens)
    while True:
        progress = False
        while total > budget and kept:
            kept.pop()
            total -= passage_cost.pop()
            progress = True
        while total > budget and len(dropped) < len(droppable):
            index = droppable[len(dropped)]
            dropped.add(index)
            total -= turn_cost[index]
            progress = True
        if not progress:
            raise ContextTooLong(total, max_tokens, engine.n_ctx)
        prompt = engine.prompt(with_memories([m for i, m in enumerate(turns) if i not in dropped], kept))
        if len(prompt.tokens) <= budget:
            return Fitted(prompt, kept, len(dropped))
        total = len(prompt.tokens)
