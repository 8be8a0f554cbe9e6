"""A chat answered by a remote OpenAI-compatible backend, with a local Session's face.

The request is committed to a backend only once its first token came: a connect error,
a 5xx, malformed JSON or a timeout before that hands it to the next candidate. After the
first token, a failure ends the answer (UpstreamBroken); the API turns it into an error
event and ``[DONE]``. Each backend has a circuit breaker and a concurrency limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from services.llm.backends.config import Backend, Backends
from services.llm.chat.answer import Answer, Done
from services.llm.engine import Message, Params
from services.llm.memories import Passage, sources
from shared.errors import BadGateway, BadRequest, ServiceUnavailable, TooManyRequests
from shared.metrics import Metrics
from shared.sse_reader import aread_json


class UpstreamFailed(Exception):
    """A backend failed before its first token: the next candidate may answer."""


class UpstreamBroken(BadGateway):
    """A backend failed after its first token: the answer ends with an error event."""


class Breaker:
    """Closed; open for ``cooldown_s`` after ``threshold`` failures in a row; then half-open:
    one probe at a time, whose success closes it and whose failure opens it again."""

    def __init__(self, threshold: int = 3, cooldown_s: float = 10.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def failed(self) -> None:
        self.failures += 1
        self.probing = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = time.monotonic()


@dataclass
class Upstream:
    """One backend's client, breaker and count of requests in flight."""

    backend: Backend
    client: httpx.AsyncClient
    breaker: Breaker
    in_flight: int = 0

    @property
    def full(self) -> bool:
        limit = self.backend.max_concurrency
        return limit is not None and self.in_flight >= limit


def refusal(response: httpx.Response) -> str:
    """The message of an OpenAI error envelope, else the status alone."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"
    return str(message)[:300]


def upstream_body(model: str, messages: list[Message], params: Params) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        body["stop"] = params.stop
    if params.seed is not None:
        body["seed"] = params.seed
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": params.json_schema},
        }
    elif params.json_object:
        body["response_format"] = {"type": "json_object"}
    return body


class RemoteSession(Answer):
    """Iterate ``tokens()``, then ``close()``; ``backend`` names who answers."""

    def __init__(
        self, metrics: BackendMetrics, passages: list[Passage], reveal: bool, warnings: list[str], rag_used: int
    ) -> None:
        self._metrics = metrics
        self._passages = passages
        self._reveal = reveal
        self._warnings = warnings
        self._rag_used = rag_used
        self.backend = ""
        self.done: Done | None = None
        self._upstream: Upstream | None = None
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[Any] | None = None
        self._pending: list[str] = []
        """Pieces read but not yet given out (the first ones, read before committing)."""
        self._usage: dict[str, int] = {}
        self._finish = "stop"
        self._started = 0.0
        self._first_at = 0.0

    async def open(self, candidates: list[tuple[Upstream, str]], messages: list[Message], params: Params) -> None:
        """Try each (upstream, model) in turn until one gives its first token."""
        tried: list[str] = []
        full = 0
        for upstream, model in candidates:
            name = upstream.backend.name
            if upstream.full:
                full += 1
                tried.append(f"{name} (at its concurrency limit)")
                continue
            if not upstream.breaker.allow():
                tried.append(f"{name} (circuit open)")
                continue
            upstream.in_flight += 1
            try:
                await self._start(upstream, upstream_body(model, messages, params))
            except UpstreamFailed as exc:
                upstream.in_flight -= 1
                upstream.breaker.failed()
                self._metrics.requests.labels(name, "failed").inc()
                tried.append(f"{name} ({exc})")
                continue
            except BaseException:
                upstream.in_flight -= 1
                raise
            upstream.breaker.succeeded()  # it answered: a failure later counts anew
            self.backend = name
            self._upstream = upstream
            return
        if full and full == len(candidates):
            raise TooManyRequests("every backend for this model is at its concurrency limit", retry_after_s=1)
        raise ServiceUnavailable(
            "no backend could answer: " + "; ".join(tried), retry_after_s=5, code="backend_unavailable"
        )

    async def _start(self, upstream: Upstream, body: dict[str, Any]) -> None:
        backend = upstream.backend
        headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
        self._started = time.monotonic()
        try:
            async with asyncio.timeout(backend.timeout_s):
                request = upstream.client.build_request(
                    "POST", f"{backend.url}/chat/completions", json=body, headers=headers, timeout=backend.timeout_s
                )
                self._response = await upstream.client.send(request, stream=True)
                status = self._response.status_code
                if status >= 500 or status in (408, 429):
                    raise UpstreamFailed(f"HTTP {status}")
                if status >= 400:
                    await self._response.aread()
                    raise BadRequest(f"the backend {backend.name!r} refused the request: {refusal(self._response)}")
                self._chunks = aread_json(self._response.aiter_lines())
                while not self._pending:
                    if not await self._read():
                        break
        except (UpstreamFailed, BadRequest):
            await self._discard()
            raise
        except TimeoutError:
            await self._discard()
            raise UpstreamFailed(f"no first token within {backend.timeout_s:g} s") from None
        except (httpx.HTTPError, ValueError) as exc:
            await self._discard()
            raise UpstreamFailed(type(exc).__name__) from None
        self._first_at = time.monotonic()

    async def _discard(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        self._response = self._chunks = None

    async def _read(self) -> bool:
        """One chunk into ``_pending`` and the usage; False at the end of the stream."""
        assert self._chunks is not None
        chunk = await anext(self._chunks, None)  # ValueError: not JSON
        if chunk is None:
            return False
        if not isinstance(chunk, dict):
            raise ValueError("a chunk is not an object")
        if isinstance(chunk.get("usage"), dict):
            self._usage = {k: int(v) for k, v in chunk["usage"].items() if isinstance(v, int)}
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._pending.append(str(delta["content"]))
            if choice.get("finish_reason"):
                self._finish = str(choice["finish_reason"])
        return True

    async def tokens(self) -> AsyncIterator[str]:
        upstream = self._upstream
        assert upstream is not None
        pieces = 0
        try:
            while True:
                while self._pending:
                    pieces += 1
                    yield self._pending.pop(0)
                if self._chunks is None or not await self._read():
                    break
        except (httpx.HTTPError, ValueError) as exc:
            upstream.breaker.failed()
            self._metrics.requests.labels(self.backend, "broken").inc()
            raise UpstreamBroken(f"the backend {self.backend!r} failed mid-answer ({type(exc).__name__})") from None
        ended = time.monotonic()
        completion = self._usage.get("completion_tokens", pieces)
        self._metrics.requests.labels(self.backend, "ok").inc()
        self._metrics.ttft.labels(self.backend).observe(self._first_at - self._started)
        if completion > 1 and ended > self._first_at:
            self._metrics.tokens_per_s.labels(self.backend).observe((completion - 1) / (ended - self._first_at))
        self.done = Done(
            finish_reason=self._finish,
            prompt_tokens=self._usage.get("prompt_tokens", 0),
            completion_tokens=completion,
            sources=sources(self._passages, self._reveal),
            rag_context_used=self._rag_used,
            gpu_wait_time=0.0,
            inference_time=round(ended - self._started, 4),
            device=f"backend:{self.backend}",
            warnings=self._warnings,
        )

    async def close(self, *, client_gone: bool) -> None:
        """Cancel the upstream request if it still runs (the client gone), free the slot."""
        await self._discard()
        if self._upstream is not None:
            if client_gone:
                self._metrics.requests.labels(self.backend, "client_gone").inc()
            self._upstream.in_flight -= 1
            self._upstream = None


class BackendMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter(
            "llm_backend_requests_total", "Chats sent to remote backends, by outcome.", ("backend", "outcome")
        )
        self.ttft = metrics.histogram(
            "llm_backend_time_to_first_token_seconds", "From sending to a backend to its first token.", ("backend",)
        )
        self.tokens_per_s = metrics.histogram(
            "llm_backend_tokens_per_second",
            "Decode speed of a backend's answers.",
            ("backend",),
            buckets=(1, 5, 10, 20, 40, 60, 100, 200, 500, 1000),
        )
        self.breaker_open = metrics.gauge(
            "llm_backend_circuit_open", "1 while a backend's circuit is open.", ("backend",)
        )


class Remote:
    """The configured backends, their clients and breakers, and the routing rules."""

    def __init__(self, backends: Backends, metrics: BackendMetrics) -> None:
        self.backends = backends
        self.metrics = metrics
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.upstreams = {
            b.name: Upstream(b, self.client, Breaker(b.circuit_failures, b.circuit_cooldown_s))
            for b in backends.backends
        }

    def models(self) -> list[str]:
        return self.backends.models()

    def for_model(self, model: str) -> list[tuple[Upstream, str]]:
        """The candidates for a chat that names a backend's model."""
        return [(self.upstreams[b.name], model) for b in self.backends.serving(model)]

    def routed(self, hint: str | None, prompt_tokens: Callable[[], int]) -> list[tuple[Upstream, str]]:
        """A local-model chat moved by a hint or prompt-size rule: the rule's backend with
        its first model; [] to stay local. ``prompt_tokens`` is counted only if a rule asks."""
        for rule in self.backends.rules:
            if (rule.hint is not None and rule.hint == hint) or (
                rule.prompt_tokens_over is not None and prompt_tokens() > rule.prompt_tokens_over
            ):
                upstream = self.upstreams[rule.backend]
                return [(upstream, upstream.backend.models[0])]
        return []

    def gpu_wait_rule(self) -> tuple[float, list[tuple[Upstream, str]]] | None:
        """(seconds, candidates): wait this long for the GPU, then go to the backend instead
        of falling back to the CPU."""
        for rule in self.backends.rules:
            if rule.gpu_wait_over_ms is not None:
                upstream = self.upstreams[rule.backend]
                return rule.gpu_wait_over_ms / 1000, [(upstream, upstream.backend.models[0])]
        return None

    def info(self) -> list[dict[str, Any]]:
        """Each backend's state, for admins (no URL or key: those stay in the file)."""
        return [
            {
                "name": u.backend.name,
                "models": list(u.backend.models),
                "circuit": u.breaker.state,
                "in_flight": u.in_flight,
                "max_concurrency": u.backend.max_concurrency,
            }
            for u in self.upstreams.values()
        ]

    async def aclose(self) -> None:
        await self.client.aclose()
