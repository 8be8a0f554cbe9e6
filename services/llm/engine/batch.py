"""Continuous batching: many sequences generated at once, in one llama.cpp batch per step.

One thread owns the model (services/llm/engine/model.py) and runs steps. Each step:

1. **Leaves**: a sequence that was cancelled (its client left), ran past its deadline, or
   ended, leaves at once; its KV cells are freed, or kept as a prefix for the requests
   that start the same way (services/llm/engine/kv.py).
2. **Joins**: waiting requests take free slots, in turn between subjects (one user with
   eight streams does not hold back another's one), as far as the KV cells allow: a
   request reserves its prompt and its ``max_tokens`` when it starts, so a running
   sequence never runs out of room; one that does not fit waits for room and never
   fails for room that others hold. A request starts from the longest prefix it may
   reuse and prefills only the rest.
3. **The fence**: ``may_step()`` (the GPU policy's lease check) before every decode. When
   it says no, nothing is decoded: every stream pauses at a token boundary until the
   policy opens the gate again (``hold``/``open``).
4. **One decode**: every decoding sequence's last token, and a chunk of the prompts
   still being read (``chunk`` tokens in all, about one decode step's worth), so a long
   prompt does not stall the streams already running for longer than one chunk.
5. **Sampling**: each sequence with logits draws its next token with its own sampler
   (services/llm/engine/sampling.py); its text goes to its caller, held back only while
   it may be the start of a stop string.

``reload`` moves the model to another number of GPU layers between steps: each running
sequence's cells go to host memory and come back in the new context (or it is prefilled
again if they cannot), so no stream is cut and none starts over.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from services.llm.engine.kv import Entry, PrefixCache
from services.llm.engine.model import Model, measure_chunk
from services.llm.engine.sampling import Choice, GrammarDeadEnd, Sampler, SamplingParams
from shared.aio import ThreadInbox

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Request:
    tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    subject: str = ""
    """Whose request: the turn it waits for, and whose cached prefixes it may reuse."""
    public_prefix: int = 0
    """Leading tokens of a prompt the service itself wrote: any subject may reuse them."""
    deadline: float | None = None
    """Monotonic time at which the generation stops (``finish_reason`` length, ``cut`` deadline)."""
    keep: bool = True
    """Keep its cells, once it ends, for the requests that start the same way."""
    logprobs: int | None = None
    """None, or how many of the most likely tokens to report beside each token's own
    log-probability (0: its own only)."""
    group: str | None = None
    """Choices of one request (``n``): the same prompt, read once. A member that finds
    another of its group running takes that one's prompt cells (shared, not copied)
    instead of reading the prompt again, and waits while that one is still reading it."""


@dataclass(frozen=True)
class Candidate:
    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens at its place."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[Candidate]


@dataclass
class Finished:
    reason: str
    """``stop`` or ``length``."""
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int = 0
    """Prompt tokens taken from the KV cache instead of prefilled."""
    queued_s: float = 0.0
    """From submission to a slot."""
    cut: str | None = None
    """Why it stopped short, if it did: ``deadline``."""


class Cancelled(Exception):
    """The caller stopped the generation (client gone)."""


class Generation:
    """A request being generated: ``async for`` its text pieces, then its Finished.
    ``cancel()`` (from any thread) makes it leave at the next step."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.inbox: ThreadInbox[object] = ThreadInbox()
        self._cancelled = threading.Event()
        self.submitted = time.monotonic()
        self.finished: Finished | None = None
        self._logprobs: list[TokenLogprob] = []

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of the tokens whose text came since the last call (on the
        loop's thread, between pieces)."""
        taken, self._logprobs = self._logprobs, []
        return taken

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def __aiter__(self) -> AsyncIterator[str | Finished]:
        while True:
            item = await self.inbox.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, TokenLogprob):
                self._logprobs.append(item)
                continue
            if isinstance(item, Finished):
                self.finished = item
                yield item
                return
            yield str(item)


class StopFinder:
    """Text as it may be shown: up to a stop string, never the stop string itself, and
    holding back only what may still become one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(what may be shown now, whether a stop string was met)."""
        held = self._held + text
        first = -1
        for stop in self._stops:
            at = held.find(stop)
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first >= 0:
            self._held = ""
            return held[:first], True
        keep = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(held)), 0, -1):
                if held.endswith(stop[:size]):
                    keep = max(keep, size)
                    break
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class FairQueue:
    """Waiting generations, one queue per subject, taken in turn."""

    def __init__(self) -> None:
        self._by_subject: OrderedDict[str, deque[Generation]] = OrderedDict()

    def put(self, generation: Generation) -> None:
        self._by_subject.setdefault(generation.request.subject, deque()).append(generation)

    def peek(self) -> Generation | None:
        for queue in self._by_subject.values():
            if queue:
                return queue[0]
        return None

    def skip(self) -> None:
        """The first subject goes to the back of the line without taking its turn."""
        subject = next(iter(self._by_subject))
        self._by_subject.move_to_end(subject)

    @property
    def subjects(self) -> int:
        return len(self._by_subject)

    def pop(self) -> Generation:
        """The first waiting generation of the subject whose turn it is; that subject goes
        to the back of the line."""
        subject, queue = next(iter(self._by_subject.items()))
        generation = queue.popleft()
        self._by_subject.move_to_end(subject)
        if not queue:
            del self._by_subject[subject]
        return generation

    def drop_cancelled(self) -> list[Generation]:
        gone = []
        for subject in list(self._by_subject):
            queue = self._by_subject[subject]
            kept = deque(g for g in queue if not g.cancelled)
            gone += [g for g in queue if g.cancelled]
            if kept:
                self._by_subject[subject] = kept
            else:
                del self._by_subject[subject]
        return gone

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_subject.values())

    def by_subject(self) -> dict[str, int]:
        return {subject: len(queue) for subject, queue in self._by_subject.items()}


class _Sequence:
    def __init__(
        self,
        generation: Generation,
        slot: int,
        sampler: Sampler,
        reused: int,
        reserved: int,
        source: Entry | None = None,
    ) -> None:
        request = generation.request
        self.generation = generation
        self.request = request
        self.slot = slot
        self.sampler = sampler
        self.history: list[int] = list(request.tokens[:reused])
        """The tokens in this sequence's KV cells, by position."""
        self.pending = list(request.tokens[reused:])
        """Prompt tokens still to prefill."""
        self.reused = reused
        self.reserved = reserved
        """KV cells counted for it: its prompt and ``max_tokens``, the reused ones too."""
        self.source = source
        """The cache entry whose first ``reused`` cells it shares (they exist once)."""
        self.last: int | None = None
        """The token sampled last, to decode at the next step."""
        self.index: int | None = None
        self.made = 0
        self.bytes = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops = StopFinder(request.stop)
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.grammar_ms = 0.0
        self.slow = False
        """Its grammar took more than a step's budget once: it samples on the side from now on."""
        self.aside: Future[Choice] | None = None

    @property
    def position(self) -> int:
        return len(self.history)

    @property
    def prefilling(self) -> bool:
        return bool(self.pending)


@dataclass
class Stats:
    """What the scheduler did, for metrics and /v1/info (read from other threads)."""

    steps: int = 0
    prefill_chunks: int = 0
    decoded_tokens: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0
    """Prompt tokens taken from cached prefixes instead of prefilled."""
    resampled: int = 0
    finished: int = 0
    cancelled: int = 0
    deadlines: int = 0
    aside: int = 0
    """Tokens sampled on the side (a grammar dearer than the step's budget)."""
    shared_prompts: int = 0
    """Choices that took their prompt's cells from another choice of their request."""
    decode_s: float = 0.0
    step_s: float = 0.0


class Scheduler:
    def __init__(
        self,
        load: Callable[[int], Model],
        *,
        gpu_layers: int,
        parallel: int,
        chunk: int,
        cache_entries: int,
        cache_cells: int,
        grammar_step_ms: float = 10.0,
    ) -> None:
        """Starts the thread, which loads the model (and, with ``chunk`` 0, measures the
        chunk). Every llama.cpp computation runs on that one thread: llama.cpp's OpenMP
        pool belongs to the thread that calls it, and two pools on two cores fight (a
        decode step measured 50% slower with the model loaded on another thread)."""
        self._load = load
        self.grammar_step_ms = grammar_step_ms
        """A sequence whose grammar takes longer than this for one token samples on the side."""
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-grammar")
        self.model: Model
        self.parallel = parallel
        self.chunk = chunk
        self.chunk_measured: dict[str, float] = {}
        self._free_slots = list(range(parallel - 1, -1, -1))
        self.cache = PrefixCache(list(range(parallel, parallel + cache_entries)), cache_cells)
        self._running: dict[int, _Sequence] = {}
        self._queue = FairQueue()
        self._incoming: deque[Generation] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._lock = threading.Condition()
        self._holds = 0
        self._fenced = False
        self._idle = threading.Event()
        self._idle.set()
        self._closing = False
        self._reserved = 0
        self.stats = Stats()
        self.may_step: Callable[[], bool] = lambda: True
        """The fence, asked before every decode (the GPU policy sets it)."""
        self.on_blocked: Callable[[], None] = lambda: None
        """Called (on the scheduler's thread) when ``may_step`` said no: the policy hands over."""
        loaded: Future[Model] = Future()
        self._thread = threading.Thread(target=self._run, args=(gpu_layers, loaded), name="llm-batch", daemon=True)
        self._thread.start()
        loaded.result()

    # -- from other threads -------------------------------------------------------------

    def submit(self, request: Request) -> Generation:
        """Queue a request (on the event loop's thread: its inbox belongs to that loop)."""
        generation = Generation(request)
        with self._lock:
            self._incoming.append(generation)
            self._lock.notify()
        return generation

    def wake(self) -> None:
        """Look again (a generation was cancelled)."""
        with self._lock:
            self._lock.notify()

    def hold(self) -> None:
        """Stop decoding after the step under way (blocks until it is over); ``open``
        undoes it. Holds nest: the engine steps again once every hold is undone."""
        with self._lock:
            self._holds += 1
        self._idle.wait()

    def open(self) -> None:
        with self._lock:
            self._holds = max(0, self._holds - 1)
            self._lock.notify()

    def unfence(self) -> None:
        """Ask ``may_step`` again (after it said no and the policy dealt with it)."""
        with self._lock:
            self._fenced = False
            self._lock.notify()

    @property
    def is_open(self) -> bool:
        return self._holds == 0 and not self._fenced

    def call(self, work: Callable[[], T]) -> Future[T]:
        """Run ``work`` on the scheduler's thread between steps (even while held)."""
        future: Future[T] = Future()
        with self._lock:
            self._commands.append((work, future))
            self._lock.notify()
        return future

    @property
    def busy(self) -> bool:
        """Something runs or waits."""
        return bool(self._running or self._queue or self._incoming)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def reserved(self) -> int:
        return self._reserved

    def waiting_by_subject(self) -> dict[str, int]:
        return self._queue.by_subject()

    @property
    def waiting(self) -> int:
        return len(self._queue) + len(self._incoming)

    def info(self) -> dict[str, Any]:
        running = list(self._running.values())
        return {
            "parallel": self.parallel,
            "running": len(running),
            "prefilling": sum(1 for s in running if s.prefilling),
            "waiting_by_subject": self._queue.by_subject(),
            "prefill_chunk": self.chunk,
            "kv_cells": self.model.cells,
            "kv_cells_reserved": self._reserved,
            "prefix_cache": self.cache.info(),
            "gpu_layers": self.model.gpu_layers,
        }

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout=30)
        self._side.shutdown(wait=True)
        for sequence in list(self._running.values()):
            sequence.sampler.close()
        self.model.close()

    # -- the thread ---------------------------------------------------------------------

    def _start(self, gpu_layers: int, loaded: Future[Model]) -> bool:
        try:
            model = self._load(gpu_layers)
            if self.chunk <= 0:
                self.chunk, self.chunk_measured = measure_chunk(model, self.parallel)
                log.info("prefill chunk measured", extra={"chunk": self.chunk, **self.chunk_measured})
        except BaseException as exc:
            loaded.set_exception(exc)
            return False
        self.model = model
        loaded.set_result(model)
        return True

    def _run(self, gpu_layers: int, loaded: Future[Model]) -> None:
        if not self._start(gpu_layers, loaded):
            return
        while True:
            command = None
            waited = False
            with self._lock:
                while self._incoming:
                    self._queue.put(self._incoming.popleft())
                if self._closing:
                    self._fail_all(Cancelled())
                    return
                if self._commands:
                    command = self._commands.popleft()
                elif self.is_open and (self._running or len(self._queue)):
                    self._idle.clear()
                else:
                    self._idle.set()
                    self._lock.wait(timeout=0.5 if self._running else None)
                    waited = True
            if command is not None:
                work, future = command
                try:
                    future.set_result(work())
                except BaseException as exc:
                    future.set_exception(exc)
                continue
            if waited:  # held or idle: a client that left still frees its slot at once
                self._leave()
                self._leave_cancelled_waiting()
                continue
            try:
                _t = time.perf_counter()
                self._step()
                self.stats.step_s += time.perf_counter() - _t
            except Exception:
                log.exception("a batch step failed; ending the sequences in it")
                self._fail_all(RuntimeError("the model failed while generating"))
            finally:
                self._idle.set()

    def _leave_cancelled_waiting(self) -> None:
        for generation in self._queue.drop_cancelled():
            self.stats.cancelled += 1
            generation.inbox.put(Cancelled())

    def _step(self) -> None:
        self._leave()
        self._take_aside()
        self._leave_cancelled_waiting()
        self._join()
        if not self._running:
            return
        if not self.may_step():
            with self._lock:
                self._fenced = True
            self.on_blocked()
            return
        model = self.model
        model.clear_batch()
        for sequence in self._running.values():
            sequence.index = None
            if not sequence.prefilling and sequence.last is not None:
                sequence.index = model.add(sequence.last, sequence.position, sequence.slot, True)
        decoding = any(not s.prefilling for s in self._running.values())
        # A chunk holds the decoding streams back by about one step; with none decoding
        # there is nobody to hold back, and prompts are read as fast as a batch allows.
        budget = self.chunk if decoding else max(self.chunk, model.shape.batch - self.parallel)
        planned: list[tuple[_Sequence, int]] = []
        for sequence in sorted(self._running.values(), key=lambda s: s.started):
            if budget <= 0:
                break
            if not sequence.prefilling:
                continue
            take = min(budget, len(sequence.pending))
            start = sequence.position
            for offset in range(take):
                last = offset == take - 1 and take == len(sequence.pending)
                index = model.add(sequence.pending[offset], start + offset, sequence.slot, last)
                if last:
                    sequence.index = index
            planned.append((sequence, take))
            budget -= take
        if model.n_batch == 0:
            waiting = [s.aside for s in self._running.values() if s.aside is not None]
            if waiting:  # only tokens being sampled on the side: wait for the first of them
                wait_futures(waiting, timeout=0.05, return_when=FIRST_COMPLETED)
            return
        _t0 = time.perf_counter()
        code = model.decode()
        self.stats.decode_s += time.perf_counter() - _t0
        if code == 1:  # no room in the KV cache (the reservations should prevent it): make some, once
            log.warning("the KV cache had no room for a step; dropping the cached prefixes")
            self._drop_cache()
            code = model.decode()
        if code != 0:
            raise RuntimeError(f"llama_decode failed ({code})")
        self.stats.steps += 1
        if planned:
            self.stats.prefill_chunks += 1
        for sequence, take in planned:
            sequence.history.extend(sequence.pending[:take])
            del sequence.pending[:take]
            self.stats.prefilled_tokens += take
        for sequence in list(self._running.values()):
            if sequence.index is None:
                continue
            if sequence.last is not None and not sequence.prefilling:
                sequence.history.append(sequence.last)
                self.stats.decoded_tokens += 1
            self._sample(sequence)

    def _sample(self, sequence: _Sequence) -> None:
        assert sequence.index is not None
        logits = self.model.logits(sequence.index)
        if sequence.slow:
            # Its grammar costs more than a step's budget: it is sampled on the side, from
            # a copy of its logits, and sits out the steps until its token is ready, so
            # that it does not hold the other streams back.
            sequence.last = None
            sequence.aside = self._side.submit(sequence.sampler.choose, logits.copy())
            self.stats.aside += 1
            return
        try:
            choice = sequence.sampler.choose(logits)
        except GrammarDeadEnd:
            self._end(sequence, "stop")
            return
        self._take(sequence, choice)

    def _take_aside(self) -> None:
        """The tokens sampled on the side that are ready."""
        for sequence in list(self._running.values()):
            aside = sequence.aside
            if aside is None or not aside.done():
                continue
            sequence.aside = None
            try:
                choice = aside.result()
            except GrammarDeadEnd:
                self._end(sequence, "stop")
                continue
            self._take(sequence, choice)

    def _take(self, sequence: _Sequence, choice: Choice) -> None:
        sequence.grammar_ms += choice.grammar_ms
        if choice.grammar_ms > self.grammar_step_ms:
            sequence.slow = True
        if choice.resampled:
            self.stats.resampled += 1
        if sequence.first_at is None:
            sequence.first_at = time.monotonic()
        if self.model.is_end(choice.token):
            self._end(sequence, "stop")
            return
        sequence.made += 1
        sequence.last = choice.token
        piece = self.model.piece(choice.token)
        if choice.logprob is not None:
            sequence.generation.inbox.put(self._logprob(piece, choice))
        text = sequence.bytes.decode(piece)
        shown, stopped = sequence.stops.feed(text)
        if shown:
            sequence.generation.inbox.put(shown)
        if stopped:
            self._end(sequence, "stop", flush=False)
        elif sequence.made >= sequence.request.max_tokens:
            self._end(sequence, "length")

    def _logprob(self, piece: bytes, choice: Choice) -> TokenLogprob:
        assert choice.logprob is not None
        top = []
        for token, logprob in choice.top:
            spelled = self.model.piece(token)
            top.append(Candidate(spelled.decode("utf-8", "replace"), list(spelled), logprob))
        return TokenLogprob(piece.decode("utf-8", "replace"), list(piece), choice.logprob, top)

    def _end(self, sequence: _Sequence, reason: str, *, flush: bool = True, cut: str | None = None) -> None:
        if flush:
            rest = sequence.stops.flush() + sequence.bytes.decode(b"", final=True)
            if rest:
                sequence.generation.inbox.put(rest)
        finished = Finished(
            reason,
            len(sequence.request.tokens),
            sequence.made,
            sequence.reused,
            round(sequence.started - sequence.generation.submitted, 4),
            cut,
        )
        self.stats.finished += 1
        self._release(sequence, keep=sequence.request.keep)  # first: its caller sees the slot free
        sequence.generation.inbox.put(finished)

    def _release(self, sequence: _Sequence, *, keep: bool) -> None:
        """Free a sequence's slot and reservation; its cells become a cache entry or are freed."""
        if sequence.aside is not None:  # its sampler is in use on the side: let it finish
            with contextlib.suppress(Exception):
                sequence.aside.result()
            sequence.aside = None
        del self._running[sequence.slot]
        self._reserved -= sequence.reserved
        sequence.sampler.close()
        model = self.model
        if keep and sequence.position > 0 and not sequence.prefilling:
            slot = self.cache.take_slot()
            if slot is not None:
                model.forget(slot)  # whatever an evicted entry held there
                model.share(sequence.slot, slot, sequence.position)
                public = min(sequence.request.public_prefix, sequence.position)
                tokens = np.asarray(sequence.history, dtype=np.int32)
                self._trim_cache(sparing=self.cache.add(slot, tokens, sequence.request.subject, public))
        model.forget(sequence.slot)
        self._free_slots.append(sequence.slot)

    def _trim_cache(self, sparing: Entry) -> None:
        """Older entries out until the cache is within its budget. The newest stays, however
        long: a conversation's latest turn is what its next turn starts from."""
        while self.cache.cells > self.cache.budget_cells:
            evicted = self.cache.evict_oldest(sparing=sparing)
            if evicted is None:
                return
            self.model.forget(evicted)
            self.cache.give_back(evicted)

    def _drop_cache(self) -> None:
        for sequence in self.cache.clear():
            self.model.forget(sequence)

    def _leave(self) -> None:
        now = time.monotonic()
        for sequence in list(self._running.values()):
            if sequence.generation.cancelled:
                self.stats.cancelled += 1
                self._release(sequence, keep=False)
                sequence.generation.inbox.put(Cancelled())
            elif sequence.request.deadline is not None and now >= sequence.request.deadline:
                self.stats.deadlines += 1
                log.warning(
                    "a generation reached its time budget; ending it",
                    extra={"completion_tokens": sequence.made, "subject_queue": sequence.request.subject != ""},
                )
                self._end(sequence, "length", cut="deadline")

    def _join(self) -> None:
        """Waiting requests into free slots, in turn between subjects, as room allows."""
        model = self.model
        skipped = 0
        while self._free_slots and len(self._queue) and skipped < self._queue.subjects:
            generation = self._queue.peek()
            assert generation is not None
            request = generation.request
            tokens = np.asarray(request.tokens, dtype=np.int32)
            sibling = self._sibling(request)
            if sibling is not None and sibling.prefilling:
                self._queue.skip()  # its prompt is being read: it shares it once it is
                skipped += 1
                continue
            entry, reuse = self.cache.best(tokens, request.subject)
            reuse = min(reuse, len(tokens) - 1)  # at least one token is read, for its logits
            need = len(tokens) + request.max_tokens
            if need > model.cells:  # never fits (the chat service refuses these before)
                self._queue.pop()
                generation.inbox.put(
                    ValueError(f"the prompt and max_tokens need {need} KV cells; the context has {model.cells}")
                )
                continue
            # Room: the cells it would share with its entry are there already. Other
            # entries give way first; the entry itself last (the prompt is then read whole).
            while short := self._cells_in_use() + need - (reuse if entry else 0) > model.cells:
                evicted = self.cache.evict_oldest(sparing=entry)
                if evicted is None and entry is not None:
                    evicted, entry, reuse = self.cache.evict_oldest(), None, 0
                if evicted is None:
                    break
                model.forget(evicted)
                self.cache.give_back(evicted)
            if short:
                return  # waits for room that the running sequences will give back
            generation = self._queue.pop()
            try:
                sampler = Sampler(model.vocab, model.n_vocab, request.sampling, request.grammar, request.logprobs)
            except ValueError as exc:  # llama.cpp refused the grammar
                generation.inbox.put(exc)
                continue
            except Exception:  # popped already: it is answered here or never
                log.exception("a sampler could not be made; ending that request")
                generation.inbox.put(RuntimeError("the model failed while generating"))
                continue
            slot = self._free_slots.pop()
            model.forget(slot)
            if sibling is not None:
                reuse = len(tokens) - 1
                model.share(sibling.slot, slot, reuse)
                self.stats.reused_tokens += reuse
                self.stats.shared_prompts += 1
            elif entry is not None and reuse > 0:
                model.share(entry.sequence, slot, reuse)
                self.cache.used(entry, reuse)
                self.stats.reused_tokens += reuse
            else:
                entry, reuse = None, 0
            self._reserved += need
            self._running[slot] = _Sequence(generation, slot, sampler, reuse, need, None if sibling else entry)

    def _cells_in_use(self) -> int:
        """KV cells taken, at most: the running sequences' reservations and the cache's
        entries, less the cells a running sequence shares with an entry still cached
        (counted in both, held once)."""
        live = {id(e) for e in self.cache.entries}
        shared = sum(s.reused for s in self._running.values() if s.source is not None and id(s.source) in live)
        return self._reserved + self.cache.cells - shared

    def _sibling(self, request: Request) -> _Sequence | None:
        """A running member of the request's group that holds (or is reading) its prompt."""
        if request.group is None:
            return None
        prompt = len(request.tokens)
        for sequence in self._running.values():
            same = sequence.request.group == request.group and sequence.request.tokens == request.tokens
            if same and (sequence.prefilling or sequence.position >= prompt - 1):
                return sequence
        return None

    def _fail_all(self, error: BaseException) -> None:
        for sequence in list(self._running.values()):
            sequence.generation.inbox.put(error)
            with contextlib.suppress(Exception):
                self._release(sequence, keep=False)

    # -- moving the model -----------------------------------------------------------------

    def reload(self, gpu_layers: int) -> float:
        """(On the scheduler's thread, held.) The model with ``gpu_layers`` on the GPU; the
        running sequences' cells carried over through host memory. Returns the seconds."""
        started = time.monotonic()
        saved = {slot: self.model.save(slot) for slot, s in self._running.items() if s.position > 0}
        self.cache.clear()
        self.model.close()
        self.model = self._load(gpu_layers)
        for slot, data in saved.items():
            if not self.model.restore(slot, data):
                sequence = self._running[slot]
                log.warning("a sequence's cells did not come back; it is read again", extra={"slot": slot})
                sequence.pending = sequence.history + sequence.pending
                sequence.history = []
        return time.monotonic() - started

    def run_reload(self, gpu_layers: int) -> Future[float]:
        return self.call(lambda: self.reload(gpu_layers))


async def hold(scheduler: Scheduler) -> None:
    """``scheduler.hold()`` off the event loop."""
    await asyncio.to_thread(scheduler.hold)
