"""The gateway's parts, built from its settings: ``build(settings)``. The app (app.py) is
made from them, so a test can hand it a proxy of its own (services behind an in-process
transport, or none) and serve it without a network."""

from __future__ import annotations

from dataclasses import dataclass

from services.gateway.proxy import Proxy
from services.gateway.settings import GatewaySettings
from shared.metrics import Metrics
from shared.settings import load_settings


@dataclass
class Parts:
    settings: GatewaySettings
    proxy: Proxy
    metrics: Metrics

    async def close(self) -> None:
        await self.proxy.aclose()


def build(settings: GatewaySettings | None = None, proxy: Proxy | None = None) -> Parts:
    """The gateway's parts; ``proxy`` replaces the one its settings name (its upstreams)."""
    settings = settings or load_settings(GatewaySettings)
    proxy = proxy or Proxy(settings.upstreams(), settings.connect_timeout_s)
    return Parts(settings, proxy, Metrics("gateway"))
