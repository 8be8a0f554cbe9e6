from __future__ import annotations

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.protocol.coordinator import Priority
from shared.settings import AuthSettings, ServiceSettings


def _service_priorities() -> dict[str, Priority]:
    return {"llm": "interactive", "transcription": "interactive"}


class CoordinatorSettings(ServiceSettings):
    """GPU coordinator. Environment prefix ``COORDINATOR_``."""

    model_config = SettingsConfigDict(env_prefix="COORDINATOR_")

    port: int = Field(default=8002, ge=1, le=65535)
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("COORDINATOR_REDIS_URL", "REDIS_URL"),
    )
    """Redis holding the lease, the queue, the fence counter and the history."""
    redis_timeout_ms: int = Field(default=2000, ge=50, le=10000)
    """Socket timeout towards Redis; must stay below a third of the default TTL."""
    key_prefix: str = Field(default="baton:gpu:", min_length=1, max_length=64)
    """Prefix of every Redis key, so tests and stacks can share one Redis."""
    default_ttl_ms: int = Field(default=15000, ge=1000, le=120000)
    """TTL of a lease whose request does not give one."""
    max_ttl_ms: int = Field(default=120000, ge=1000, le=120000)
    """Largest TTL a lease may ask for; also the quarantine after Redis lost its data."""
    max_queue: int = Field(default=64, ge=1, le=10000)
    """Waiters beyond this many get 429."""
    max_batch_wait_ms: int = Field(default=60000, ge=0)
    """A batch waiter that has waited this long in all (since it last held a whole slice)
    goes next, before interactive ones."""
    yield_grace_ms: int = Field(default=30000, ge=0)
    """A holder asked to yield (whoever waits) that has not released is revoked after this."""
    waiter_heartbeat_ms: int = Field(default=5000, ge=500, le=60000)
    """A queued waiter whose coordinator stopped refreshing it is dropped after this."""
    history_size: int = Field(default=1000, ge=10, le=100000)
    """How many ended grants the history keeps."""
    gpu_memory_mb: int | None = Field(default=None, ge=0, le=1_048_576)
    """The card's memory in MB. Unset: read from NVML at start (0 where there is none,
    as on a CPU: then no holder ever has to free its memory to hand the card over)."""
    priorities: dict[str, Priority] = Field(default_factory=_service_priorities)
    """The highest priority each service may ask for (JSON). Only service tokens
    (``sub`` = ``service:<name>``) hold the GPU, as ``holder`` = ``<name>``."""
    other_services: Priority = "batch"
    """The highest priority of a service not named in ``priorities``."""
    batch_slice_ms: int = Field(default=5000, ge=0, le=600000)
    """A batch holder granted because it starved keeps the card this long before it is
    asked to yield."""
    min_hold_ms: int = Field(default=50, ge=0, le=600000)
    """An interactive holder keeps the card at least this long before another service's
    interactive waiter asks for it (a batch holder is asked at once), so that two services
    serving users at once take turns with work done in each instead of swapping the card
    every few milliseconds (measured in the soak: the LLM and an upload, 10-40 ms apart)."""
    turn_ms: int = Field(default=250, ge=0, le=600000)
    """A holder is asked to yield at once only for a waiter that outranks it (interactive
    over batch, another service's interactive request, a starving batch waiter); for
    anyone else, once it has held the card this long: long enough that two holders
    which pause at once do not swap the card every few milliseconds, short enough that
    a job waits little for an idle LLM's keep-alive. Raise it where hand-overs free
    device memory (each one then costs seconds)."""

    auth: AuthSettings = Field(default_factory=AuthSettings)

    @model_validator(mode="after")
    def _timeouts_fit(self) -> CoordinatorSettings:
        if self.redis_timeout_ms * 3 > self.default_ttl_ms:
            raise ValueError(
                "COORDINATOR_REDIS_TIMEOUT_MS must be under a third of COORDINATOR_DEFAULT_TTL_MS "
                "(a renewal must be able to fail and retry within one TTL)"
            )
        if self.default_ttl_ms > self.max_ttl_ms:
            raise ValueError("COORDINATOR_DEFAULT_TTL_MS must not exceed COORDINATOR_MAX_TTL_MS")
        return self
