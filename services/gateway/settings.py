from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """The gateway: one address for every service. Environment prefix ``GATEWAY_``."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    port: int = Field(default=8000, ge=1, le=65535)
    max_body_mb: float = Field(default=64.0, gt=0, le=1024)
    """Bodies are streamed through, and each service refuses what is over its own limit;
    this only bounds what the gateway itself will carry."""
    llm_url: str = "http://127.0.0.1:8001"
    coordinator_url: str = "http://127.0.0.1:8002"
    transcription_url: str = "http://127.0.0.1:8003"
    rag_url: str = "http://127.0.0.1:8004"
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """A service that does not accept the connection this fast is answered 503
    (`service_unavailable`, with Retry-After)."""
    dev_token_file: Path | None = None
    """The launcher's stack file: the console's "use the development token" button reads
    its token from here (for a page on this machine only). Unset: no such button works."""

    supervisor_file: Path | None = None
    """The launcher's record of its processes (restarts, states): ``/ready`` shows it.
    Unset (compose, whose own restart policy restarts the containers): not shown."""

    def upstreams(self) -> dict[str, str]:
        return {
            "llm": self.llm_url.rstrip("/"),
            "coordinator": self.coordinator_url.rstrip("/"),
            "transcription": self.transcription_url.rstrip("/"),
            "rag": self.rag_url.rstrip("/"),
        }
