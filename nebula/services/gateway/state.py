"""The gateway's typed app state, shared by its OpenAI and admin handlers."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from nebula.adapters.store import Store
from nebula.core.config import GatewayConfig
from nebula.services.gateway.auth import Authenticator
from nebula.services.gateway.metrics import GatewayMetrics
from nebula.services.gateway.view import ClusterView


@dataclass
class GatewayState:
    cfg: GatewayConfig
    store: Store
    view: ClusterView
    metrics: GatewayMetrics
    auth: Authenticator
    # Opened in the app's cleanup_ctx (a session belongs to a running loop), or injected by the caller.
    session: aiohttp.ClientSession | None = field(default=None)

    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("gateway HTTP session used outside the app's lifetime")
        return self.session


GATEWAY = web.AppKey("gateway", GatewayState)
