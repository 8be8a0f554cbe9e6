"""One chat request from arrival to last token. No FastAPI here.

Order of a request: ask for the GPU at once (services/llm/gpu_policy.py: the card is
usually held by the time the prompt is ready); refuse what is over a bound; refuse when
the queue is full; look up memories; fit the prompt into the context (400 if it cannot
fit); take the request's seat (the lease the batch holds, or the CPU); then the
engine generates it beside every other request (services/llm/engine/batch.py), which
waits for a slot in turn between subjects. Every error up to the seat is an HTTP error;
after that, the stream carries it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from services.llm.backends.remote import Remote, RemoteSession, Upstream
from services.llm.chat.answer import Answer, ClientGone, Done
from services.llm.chat.cache import Cached, ResponseCache
from services.llm.chat.job import Job
from services.llm.chat.prompting import ContextTooLong, Fitted, fit, with_memories
from services.llm.conversations.store import Conversation, ConversationStore
from services.llm.engine import (
    BadSchema,
    Cancelled,
    Engine,
    Finished,
    Generation,
    Message,
    Params,
    TokenLogprob,
    grammar_text,
)
from services.llm.engine.grammar import GrammarRefused
from services.llm.engine.kv import common_prefix
from services.llm.gpu_policy import Ask, GpuBusy, GpuPolicy, Seat
from services.llm.memories import Memories, Passage, sources
from services.llm.settings import LLMSettings
from shared.aio import Interrupted, unless
from shared.errors import BadRequest, NotFound, TooManyRequests
from shared.metrics import Metrics
from shared.protocol.models import ModelList, created_at

log = logging.getLogger(__name__)


SUMMARY_INSTRUCTION = (
    "Write down what the user told you about themselves and their things, in full sentences. "
    "Keep every name exactly as written."
)
"""Asked after what the user said. Full sentences, not a list: a list item ("1. Blue
Heron") loses what the name was of."""
SUMMARY_REPEAT_PENALTY = 1.3
"""Small models loop in summaries ("I have a dog named Biscuit." four times) without it."""
SUMMARY_TOKENS = 200
"""The longest summary the model may write."""


class ChatMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.ttft = metrics.histogram(
            "llm_time_to_first_token_seconds", "From the seat to the first token (a slot and the prefill included)."
        )
        self.tokens_per_s = metrics.histogram(
            "llm_tokens_per_second", "Decode speed of a request.", buckets=(1, 5, 10, 20, 40, 60, 100, 200, 500)
        )
        self.requests = metrics.counter(
            "llm_requests_total", "Chat requests, by device and outcome.", ("device", "outcome")
        )
        self.rag = metrics.counter("llm_rag_lookups_total", "Memory lookups, by outcome.", ("outcome",))
        self.summaries = metrics.counter("llm_conversation_summaries_total", "Summaries of conversations written.")
        self.cache = metrics.counter(
            "llm_response_cache_total", "Chat requests by what the response cache did.", ("result",)
        )
        self.reused = metrics.counter(
            "llm_kv_reused_tokens_total", "Prompt tokens taken from the KV cache instead of read again."
        )


class Admission:
    """A request's place in the service between ``open`` and its end: counted against the
    queue bound, and placed by the GPU policy. ``close`` gives both back, once."""

    def __init__(self, service: ChatService, seat: Seat) -> None:
        self._service = service
        self.seat = seat
        self._closed = False

    async def close(self, *, client_gone: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._service.policy.finish(self.seat, client_gone=client_gone)
        finally:
            self._service.admitted -= 1


class Session(Answer):
    """A request the local model answers. Iterate ``tokens()``, then ``close()``."""

    holds_slot = True

    def __init__(
        self,
        service: ChatService,
        job: Job,
        fitted: Fitted,
        admission: Admission,
        warnings: list[str],
        rag_used: int,
        public_prefix: int,
    ) -> None:
        self._engine = service.engine
        self._metrics = service.metrics
        self._cache = service.cache
        self._job = job
        self._fitted = fitted
        self._admission = admission
        self.seat = admission.seat
        self._warnings = warnings
        self._rag_used = rag_used
        self._public_prefix = public_prefix
        self._generation: Generation | None = None
        self.done: Done | None = None

    async def tokens(self) -> AsyncIterator[str]:
        """Text pieces as the model makes them; ``self.done`` is set after the last."""
        job = self._job
        generation = self._engine.submit(
            self._fitted.prompt, job.params, subject=job.subject, public_prefix=self._public_prefix, group=job.group
        )
        self._generation = generation
        started = time.monotonic()
        first: float | None = None
        pieces: list[str] = []
        async for item in generation:
            if isinstance(item, Finished):
                self.done = self._finished(item, started, first)
                if job.cache_key is not None and self._cache is not None:
                    self._cache.put(job.cache_key, pieces, self.done)
                continue
            if first is None:
                first = time.monotonic()
            pieces.append(item)
            yield item

    def logprobs(self) -> list[TokenLogprob]:
        return self._generation.take_logprobs() if self._generation is not None else []

    def _finished(self, item: Finished, started: float, first: float | None) -> Done:
        metrics = self._metrics
        ended = time.monotonic()
        decode_s = ended - (first or ended)
        if first is not None:
            metrics.ttft.observe(first - started)
        if item.completion_tokens > 1 and decode_s > 0:
            metrics.tokens_per_s.observe((item.completion_tokens - 1) / decode_s)
        metrics.requests.labels(self.seat.device, "ok").inc()
        metrics.reused.inc(item.reused_tokens)
        warnings = list(self._warnings)
        if item.cut == "deadline":
            warnings.append(f"stopped at the generation's time budget ({self._engine.budget_s:g} s)")
        return Done(
            finish_reason=item.reason,
            prompt_tokens=item.prompt_tokens,
            completion_tokens=item.completion_tokens,
            sources=sources(self._fitted.passages, self._job.reveal),
            rag_context_used=self._rag_used,
            gpu_wait_time=round(self.seat.gpu_wait_s, 4),
            inference_time=round(ended - started, 4),
            device=self.seat.device,
            warnings=warnings,
            summarized_messages=self._job.conversation.summarized if self._job.conversation else None,
            cached_tokens=item.reused_tokens,
        )

    async def close(self, *, client_gone: bool) -> None:
        """Stop the generation (it leaves the batch at the next step) and give the
        request's place back."""
        generation = self._generation
        if generation is not None and generation.finished is None:
            generation.cancel()
            self._engine.scheduler.wake()
            if client_gone:
                self._metrics.requests.labels(self.seat.device, "client_gone").inc()
        await self._admission.close(client_gone=client_gone)


class CachedSession(Answer):
    """An answer from the response cache, with a Session's face: no slot, no lease."""

    cached = True

    def __init__(self, hit: Cached) -> None:
        self._hit = hit
        self.done: Done | None = None

    async def tokens(self) -> AsyncIterator[str]:
        for piece in self._hit.pieces:
            yield piece
        self.done = self._hit.done

    async def close(self, *, client_gone: bool) -> None:
        return None


Answering = Answer
"""A Session, a CachedSession or a RemoteSession."""


class ChatService:
    def __init__(
        self,
        engine: Engine,
        policy: GpuPolicy,
        memories: Memories,
        settings: LLMSettings,
        metrics: ChatMetrics,
        model_id: str,
        conversations: ConversationStore | None = None,
        cache: ResponseCache | None = None,
        remote: Remote | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.memories = memories
        self.settings = settings
        self.metrics = metrics
        self.model_id = model_id
        self.conversations = conversations
        self.cache = cache
        self.remote = remote
        self.admitted = 0
        """Requests between admission and close: those generating and those waiting for a
        slot. Taken before the first await, so a simultaneous burst cannot slip past."""

    @property
    def capacity(self) -> int:
        """Requests admitted at most: every slot, and GEMMA_MAX_QUEUE waiting."""
        return self.engine.parallel + self.settings.max_queue

    def models(self) -> list[str]:
        """The local model first, then every backend's."""
        return [self.model_id, *(self.remote.models() if self.remote is not None else [])]

    def model_list(self) -> ModelList:
        """The local model (created: its file's time), then every backend's (the backends
        file's time)."""
        local = ModelList.of("chat", self.model_id, created=created_at(self.engine.path))
        if self.remote is not None:
            local.data += ModelList.of(
                "chat", *self.remote.models(), created=created_at(self.settings.backends_file)
            ).data
        return local

    def check_model(self, name: str) -> None:
        if name not in self.models():
            raise NotFound(
                f"the model {name!r} does not exist; this service serves {', '.join(map(repr, self.models()))}",
                param="model",
                code="model_not_found",
            )

    def max_tokens(self, asked: int | None, *, also: int | None = None) -> int:
        """The answer's length: ``asked``, else the default. ``also``: a second field that
        says the same (max_tokens beside max_completion_tokens) is held to the bound too."""
        value = asked if asked is not None else self.settings.default_max_tokens
        if max(value, also or 0) > self.settings.max_tokens:
            raise BadRequest(
                f"max_tokens is at most {self.settings.max_tokens} (GEMMA_MAX_TOKENS)",
                param="max_tokens",
                code="invalid_value",
            )
        return value

    def check(self, job: Job) -> None:
        """What can be refused before any work, slot or lease."""
        if len(job.messages) > self.settings.max_messages:
            raise BadRequest(
                f"at most {self.settings.max_messages} messages (GEMMA_MAX_MESSAGES)",
                param="messages",
                code="too_many_messages",
            )
        if job.raw is not None:
            need = len(job.raw.tokens) + job.params.max_tokens
            if need > self.engine.n_ctx:
                raise BadRequest(
                    f"this model's context is {self.engine.n_ctx} tokens; the prompt takes {len(job.raw.tokens)} "
                    f"and max_tokens asks for {job.params.max_tokens}",
                    param="prompt",
                    code="context_length_exceeded",
                )
        chars = sum(len(m["content"]) for m in job.messages) + sum(len(c) for c in job.context)
        if chars > self.engine.max_prompt_chars:
            # Refused by its size before the tokenizer reads it (2 MB took it 10 s).
            raise BadRequest(
                f"the messages hold {chars} characters, more than this model's context of {self.engine.n_ctx} "
                f"tokens can hold (no token spells more than {self.engine.longest_piece})",
                param="messages",
                code="context_length_exceeded",
            )
        try:
            found = grammar_text(job.params, self.engine.grammar_limits)
        except BadSchema as exc:
            raise BadRequest(str(exc), param=exc.param, code="invalid_schema") from None
        if found is not None:
            text, param = found
            try:
                self.engine.guard.check(text, param, what="the schema")
            except GrammarRefused as exc:
                raise BadRequest(str(exc), param=exc.param, code="invalid_schema") from None

    async def open(self, job: Job, disconnected: Callable[[], Awaitable[object]]) -> Answering:
        ask = self.policy.want()  # before anything else: the card is asked for while the rest runs
        try:
            # A thread: llama.cpp compiles and times the grammar, up to a second of CPU.
            await asyncio.to_thread(self.check, job)
            if self.remote is not None and job.model not in ("", self.model_id):  # a backend's model
                ask.withdraw()
                if job.params.grammar is not None:
                    raise BadRequest("tools are served by the local model only", param="tools", code="invalid_tool")
                local_only(job)
                passages, warnings = await self._passages(job)
                return await self._remote_answer(job, passages, warnings, self.remote.for_model(job.model))
            if self.admitted >= self.capacity:  # every slot busy and the queue full
                raise TooManyRequests("the model is busy and its queue is full", retry_after_s=2)
            self.admitted += 1
            try:
                answering = await self._open(job, disconnected, ask)
            except BaseException:
                self.admitted -= 1
                raise
            if not answering.holds_slot:
                self.admitted -= 1
            return answering
        finally:
            ask.withdraw()  # nothing if the request was placed

    async def _passages(self, job: Job) -> tuple[list[Passage], list[str]]:
        """The request's own context, then the caller's memories (none for a completion)."""
        if job.raw is not None:
            return [], []
        passages, warnings = await self._memories(job)
        given = [
            Passage(f"context-{i}", text, 2.0, {"source": "request"}, origin="request")
            for i, text in enumerate(job.context)
        ]
        return given + passages, warnings

    async def _open(self, job: Job, disconnected: Callable[[], Awaitable[object]], ask: Ask) -> Answering:
        passages, warnings = await self._passages(job)
        # Tools, log-probabilities and token biases stay local: token ids are this model's.
        remote = self.remote if job.params.grammar is None and not needs_local(job) else None
        if remote is not None:
            moved = remote.routed(job.route, lambda: self._prompt_size(job, passages))
            if moved:
                ask.withdraw()
                return await self._remote_answer(job, passages, warnings, moved)
        if self.cache is not None:
            job.cache_key = self.cache.key(self.model_id, job, passages)
            if job.cache_key is None:
                self.metrics.cache.labels("uncacheable").inc()
            elif not job.use_cache:
                self.metrics.cache.labels("bypass").inc()
            elif (hit := self.cache.get(job.cache_key)) is not None:
                self.metrics.cache.labels("hit").inc()
                ask.withdraw()
                return CachedSession(hit)
            else:
                self.metrics.cache.labels("miss").inc()
        fitted = await self._fit(job, passages)
        rule = remote.gpu_wait_rule() if remote is not None else None
        try:
            seat = await unless(self.policy.place(ask, budget_s=rule[0] if rule else None), disconnected())
        except GpuBusy:  # past the rule's budget: the rule's backend rather than the CPU
            assert rule is not None
            return await self._remote_answer(job, passages, warnings, rule[1])
        except Interrupted:
            raise ClientGone() from None
        admission = Admission(self, seat)
        try:
            if job.conversation is not None and fitted.dropped_turns:
                # Too long for the window: the model summarizes the oldest turns, and the
                # prompt carries that summary instead.
                await unless(self._summarize(job.conversation, fitted.dropped_turns, job.subject), disconnected())
                fitted = await self._fit(job, passages)
        except Interrupted:
            await admission.close(client_gone=True)
            raise ClientGone() from None
        except BaseException:
            await admission.close(client_gone=False)
            raise
        if fitted.dropped_turns:
            warnings.append(f"dropped the {fitted.dropped_turns} oldest turns to fit the context window")
        if seat.fallback:
            warnings.append("the GPU was busy: answered on the CPU")
        rag_used = sum(1 for p in fitted.passages if p.origin == "memory")
        public = self._public_prefix(job, fitted)
        return Session(self, job, fitted, admission, warnings, rag_used, public)

    def _public_prefix(self, job: Job, fitted: Fitted) -> int:
        """How many of the prompt's leading tokens are the service's own words."""
        if not job.shared_prefix:
            return 0
        theirs = self.engine.prompt(job.shared_prefix).tokens
        return common_prefix(np_tokens(theirs), np_tokens(fitted.prompt.tokens))

    def _prompt_size(self, job: Job, passages: list[Passage]) -> int:
        """The prompt's tokens by the local model's tokenizer (for prompt-size rules)."""
        history = job.before()
        messages = with_memories(history + job.messages, passages)
        return sum(self.engine.count(m["content"]) for m in messages)

    async def _remote_answer(
        self, job: Job, passages: list[Passage], warnings: list[str], candidates: list[tuple[Upstream, str]]
    ) -> RemoteSession:
        """The answer from the first candidate that gives a first token. The whole
        conversation goes with the memories; fitting it is the backend's business."""
        assert self.remote is not None
        history = job.before()
        messages = with_memories(history + job.messages, passages)
        rag_used = sum(1 for p in passages if p.origin == "memory")
        session = RemoteSession(self.remote.metrics, passages, job.reveal, warnings, rag_used)
        await session.open(candidates, messages, job.params)
        return session

    async def _fit(self, job: Job, passages: list[Passage]) -> Fitted:
        if job.raw is not None:
            return Fitted(job.raw, [], 0)
        history = job.before()
        try:
            return await asyncio.to_thread(fit, self.engine, history + job.messages, passages, job.params.max_tokens)
        except ContextTooLong as exc:
            raise BadRequest(str(exc), param="messages", code="context_length_exceeded") from None

    async def _summarize(self, conversation: Conversation, dropped: int, subject: str) -> None:
        """Fold the oldest uncovered turns (at least ``dropped``, at least half of them, so
        that the next turns fit without another summary) into the stored summary."""
        uncovered = conversation.messages[conversation.summarized :]
        count = min(len(uncovered) - 1, max(dropped, len(uncovered) // 2))
        if count <= 0 or self.conversations is None:
            return
        # What the user said: the facts to carry are theirs, and the model's own earlier
        # answers are what derails a small model's summary (on the bundled SmolLM2-135M,
        # four facts in a 30-turn conversation: whole transcripts kept 0 to 2 in their
        # summaries, the user's messages 4).
        transcript = "\n".join(m["content"] for m in uncovered[:count] if m["role"] == "user")
        # Extended, not rewritten: what an earlier summary kept stays word for word...
        added = await self._summary_of(transcript, subject) if transcript else ""
        summary = " ".join(filter(None, [conversation.summary, added]))
        if self.engine.count(summary) > self.engine.n_ctx // 3:  # ...until it is itself too long
            summary = await self._summary_of(summary, subject)
        await self.conversations.summarize(conversation, summary, conversation.summarized + count)
        self.metrics.summaries.inc()

    async def _summary_of(self, text: str, subject: str) -> str:
        """A short greedy answer from the engine, beside every other request (cancelled
        with the request: it is the request's own work)."""
        # The instruction after the text: small models follow what they read last, and
        # a conversation before an instruction is not mistaken for one to continue.
        messages: list[Message] = [{"role": "user", "content": f"The user said:\n{text}\n\n{SUMMARY_INSTRUCTION}"}]
        prompt = self.engine.prompt(messages)
        budget = self.engine.n_ctx - SUMMARY_TOKENS
        if len(prompt.tokens) > budget:  # keep the most recent part of what is summarized
            prompt = type(prompt)(prompt.tokens[-budget:], prompt.stop)
        params = Params(max_tokens=SUMMARY_TOKENS, temperature=0.0, repeat_penalty=SUMMARY_REPEAT_PENALTY)
        generation = self.engine.submit(prompt, params, subject=subject)
        pieces: list[str] = []
        try:
            async for item in generation:
                if isinstance(item, str):
                    pieces.append(item)
        except Cancelled:
            raise
        finally:
            if generation.finished is None:
                generation.cancel()
                self.engine.scheduler.wake()
        return "".join(pieces).strip()

    async def _memories(self, job: Job) -> tuple[list[Passage], list[str]]:
        if job.rag is None:
            return [], []
        query = next((m["content"] for m in reversed(job.messages) if m["role"] == "user"), "")
        if not query.strip():
            return [], []
        rag = job.rag
        found = await self.memories.search(
            query, rag.top_k or self.settings.rag_top_k, rag.filter, rag.recency_bias, job.subject
        )
        self.metrics.rag.labels("ok" if found.warning is None else "unavailable").inc()
        return found.passages, [found.warning] if found.warning else []


def np_tokens(tokens: list[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


def needs_local(job: Job) -> bool:
    """The request speaks of this model's tokens (log-probabilities, token biases, a
    completion's prompt)."""
    return job.params.logprobs is not None or bool(job.params.logit_bias) or job.raw is not None


def local_only(job: Job) -> None:
    """A backend's model was named for a request only the local model can answer."""
    params = job.params
    if job.raw is not None:
        raise BadRequest("completions are served by the local model only", param="model")
    if params.logprobs is not None:
        raise BadRequest("logprobs are served by the local model only", param="logprobs")
    if params.logit_bias:
        raise BadRequest("logit_bias is served by the local model only (token ids are its own)", param="logit_bias")
