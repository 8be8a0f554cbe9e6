"""What every service's ``create_app`` starts from, written once: its guards (limits,
audit), the verifier of its callers' tokens, its metrics, its own service tokens for the
services it calls, its GPU client, its model by preset or path, and the app itself."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI

from shared.auth import ServiceTokens, TokenIssuer, TokenVerifier
from shared.gpu import Gpu, GpuClient, NoCoordinator
from shared.guards import Guards
from shared.metrics import Metrics
from shared.presets import Kind, Preset, UnknownModel, resolve
from shared.settings import AuthSettings, ConfigError, LimitSettings
from shared.web import Auth, ReadyCheck, always_ready, create_service_app


class ServiceSettings(Protocol):
    auth: AuthSettings
    limits: LimitSettings


class GpuSettings(Protocol):
    coordinate: bool
    coordinator_url: str
    lease_ttl_ms: int


@dataclass
class Foundation:
    name: str
    guards: Guards
    auth: Auth
    metrics: Metrics
    tokens: ServiceTokens
    """Tokens of this service (``service:<name>``) with the scopes it calls others with."""

    @classmethod
    def build(cls, name: str, settings: ServiceSettings, calls_with: tuple[str, ...] = ()) -> Foundation:
        guards = Guards.build(name, settings.limits)
        issuer = TokenIssuer(settings.auth)
        return cls(
            name,
            guards,
            Auth(TokenVerifier(settings.auth), guards.limiter),
            Metrics(name),
            ServiceTokens(issuer, name, calls_with, settings.auth.service_token_ttl_s),
        )

    def gpu(self, settings: GpuSettings) -> Gpu:
        """The coordinator's client, or the stand-in that grants at once when the service
        is told not to coordinate."""
        if not settings.coordinate:
            return NoCoordinator()
        return GpuClient(settings.coordinator_url, self.tokens, default_ttl_ms=settings.lease_ttl_ms)

    def app(
        self,
        max_body_mb: float,
        *,
        lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
        ready: ReadyCheck = always_ready,
        info: Callable[[], dict[str, Any]] | None = None,
        public_info: Callable[[], dict[str, Any]] | None = None,
    ) -> FastAPI:
        return create_service_app(
            name=self.name,
            auth=self.auth,
            metrics=self.metrics,
            max_body_bytes=int(max_body_mb * 1_048_576),
            lifespan=lifespan,
            ready=ready,
            info=info,
            public_info=public_info,
            audit=self.guards.audit,
        )


def model(name_or_path: str, kind: Kind, variable: str) -> tuple[Path, Preset | None]:
    """A model by preset name or path; a wrong one is a configuration error that names
    the variable to fix."""
    try:
        return resolve(name_or_path, kind)
    except UnknownModel as exc:
        raise ConfigError(f"{variable}: {exc}") from None
