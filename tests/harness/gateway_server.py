"""A gateway app served as in production (its data-plane server in front, aiohttp behind it), for tests.

It stands in for aiohttp's TestServer (the part of it the tests use), which would serve the app through
aiohttp alone and so miss the server that answers the OpenAI paths in production.
"""

from __future__ import annotations

import ssl

from aiohttp import web
from yarl import URL

from nebula.services.gateway.app import gateway_site
from nebula.services.http.site import FastSite


class GatewayServer:
    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None, shutdown_timeout_s: float = 5.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._shutdown_timeout_s = shutdown_timeout_s
        self.runner: web.AppRunner | None = None
        self.site: FastSite | None = None

    async def start_server(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                    shutdown_timeout=self._shutdown_timeout_s)
        await self.runner.setup()
        self.site = gateway_site(self.runner, self.host, self.port, self._ssl,
                                 shutdown_timeout_s=self._shutdown_timeout_s)
        await self.site.start()
        self.port = self.site.port

    def make_url(self, path: str) -> URL:
        scheme = "https" if self._ssl else "http"
        return URL(f"{scheme}://{self.host}:{self.port}{path}")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
