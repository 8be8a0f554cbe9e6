"""Remote OpenAI-compatible backends behind Baton's chat: vLLM, llama.cpp's server, a hosted API.

``GEMMA_BACKENDS_FILE`` names a YAML file, read and checked once at start-up (an error
names the file, the entry and the field)::

    backends:
      - name: cluster                       # letters, digits, _ and -
        url: http://vllm:8000/v1            # an OpenAI-compatible base URL
        api_key_file: /run/secrets/vllm_key # optional: the key, read at start-up
        models: [meta-llama/Llama-3.1-70B-Instruct]
        max_concurrency: 64                 # optional: more at once get 429
        timeout_s: 30                       # optional: connect to first token
        circuit_failures: 3                 # optional: failures in a row that open the circuit
        circuit_cooldown_s: 10              # optional: then one probe at a time
    routing:                                # optional, first match wins
      - {hint: complex, backend: cluster}   # the request's "route" field
      - {prompt_tokens_over: 6000, backend: cluster}
      - {gpu_wait_over_ms: 2000, backend: cluster}

A chat names a backend's model: that backend (and any other that lists the model, in
file order, should it fail before its first token). A chat for the local model goes to
the first rule's backend that matches, else stays local. Rules are configured, not
learned: Baton grows no scheduler of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BackendsFileError(ValueError):
    """The backends file cannot be used; the message names the file, the entry and the field."""


class BackendEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME.pattern)
    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")
    api_key_file: Path | None = None
    models: list[str] = Field(min_length=1, max_length=1000)
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    circuit_failures: int = Field(default=3, ge=1, le=1000)
    circuit_cooldown_s: float = Field(default=10.0, ge=0, le=3600)

    @field_validator("models")
    @classmethod
    def _models_named(cls, models: list[str]) -> list[str]:
        if any(not m.strip() or len(m) > 256 for m in models):
            raise ValueError("every model is a name of 1 to 256 characters")
        return models


class RoutingRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str
    hint: str | None = Field(default=None, min_length=1, max_length=64)
    prompt_tokens_over: int | None = Field(default=None, ge=0)
    gpu_wait_over_ms: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_condition(self) -> RoutingRule:
        given = [c for c in ("hint", "prompt_tokens_over", "gpu_wait_over_ms") if getattr(self, c) is not None]
        if len(given) != 1:
            raise ValueError("a rule has exactly one of hint, prompt_tokens_over, gpu_wait_over_ms")
        return self


class BackendsDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[BackendEntry] = Field(min_length=1)
    routing: list[RoutingRule] = Field(default_factory=list)


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    """The base URL, without a trailing slash: ``{url}/chat/completions``."""
    models: tuple[str, ...]
    api_key: str | None
    max_concurrency: int | None
    timeout_s: float
    circuit_failures: int
    """Failures in a row that open the circuit..."""
    circuit_cooldown_s: float
    """...for this long; then one probe at a time."""


@dataclass(frozen=True)
class Backends:
    backends: tuple[Backend, ...]
    rules: tuple[RoutingRule, ...]

    def models(self) -> list[str]:
        return list(dict.fromkeys(m for b in self.backends for m in b.models))

    def serving(self, model: str) -> list[Backend]:
        """The backends that list ``model``, in file order."""
        return [b for b in self.backends if model in b.models]

    def named(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load(path: Path, local_model: str) -> Backends:
    """The backends file, checked: BackendsFileError names the file, the entry and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BackendsFileError(f"{path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise BackendsFileError(f"{path}: not YAML{at}") from None
    try:
        document = BackendsDocument.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BackendsFileError(f"{path}: {_where(first['loc']) or 'the document'}: {first['msg']}") from None
    names: set[str] = set()
    backends = []
    for index, entry in enumerate(document.backends):
        where = f"{path}: backends[{index}] ({entry.name})"
        if entry.name in names:
            raise BackendsFileError(f"{where}.name: defined twice")
        names.add(entry.name)
        if local_model in entry.models:
            raise BackendsFileError(f"{where}.models: {local_model!r} is the local model's name")
        key = None
        if entry.api_key_file is not None:
            try:
                key = entry.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise BackendsFileError(f"{where}.api_key_file: cannot be read ({exc.strerror})") from None
            if not key:
                raise BackendsFileError(f"{where}.api_key_file: the file is empty")
        backends.append(
            Backend(
                entry.name,
                entry.url.rstrip("/"),
                tuple(entry.models),
                key,
                entry.max_concurrency,
                entry.timeout_s,
                entry.circuit_failures,
                entry.circuit_cooldown_s,
            )
        )
    for index, rule in enumerate(document.routing):
        if rule.backend not in names:
            raise BackendsFileError(f"{path}: routing[{index}].backend: no backend is named {rule.backend!r}")
    return Backends(tuple(backends), tuple(document.routing))
