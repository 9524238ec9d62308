"""The gateway's listening site: aiohttp's BaseSite whose connections start on the data-plane server
(fastserver.py), with the server's sweep (idle connections, deadlines) running beside it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from nebula.services.http.admission import ConnectionEvents, ConnectionLimits
from nebula.services.http.fastrequest import Admit, BodyLimit, Router
from nebula.services.http.fastserver import KEEPALIVE_S, FastServer
from nebula.services.http.handover_errors import json_error_handlers


class FastSite(web.BaseSite):
    """A listening TCP site (like aiohttp's TCPSite) whose connections start on the data-plane server."""

    __slots__ = ("_fast", "_host", "_port", "_reuse_port", "_shutdown_timeout_s", "_sweeper")

    def __init__(self, runner: web.BaseRunner, router: Router, host: str, port: int, *, max_body: int,
                 ssl_context: Any = None, reuse_port: bool = False, keepalive_s: float = KEEPALIVE_S,
                 shutdown_timeout_s: float = 60.0, admit: Admit | None = None,
                 limits: ConnectionLimits | None = None, events: ConnectionEvents | None = None,
                 reserve_paths: frozenset[str] = frozenset(),
                 body_limits: Mapping[str, BodyLimit] | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        server = runner.server
        assert server is not None  # BaseSite checked it
        self._fast = FastServer(router, json_error_handlers(server), max_body, keepalive_s, admit, limits, events,
                                reserve_paths, body_limits=body_limits)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the asked one, or the one the system chose for 0)."""
        # uvloop's server is no asyncio.Server, but has its sockets too.
        sockets = getattr(self._server, "sockets", None)
        if sockets:
            return int(sockets[0].getsockname()[1])
        return self._port

    @property
    def connections(self) -> int:
        """Connections this server reads (not those it handed to aiohttp)."""
        return len(self._fast.connections)

    @property
    def server(self) -> FastServer:
        return self._fast

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._fast, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, reuse_address=True,
                                                reuse_port=self._reuse_port or None)
        self._sweeper = loop.create_task(self._fast.keep_sweeping(), name="fastserver-sweep")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._fast.shutdown(self._shutdown_timeout_s)
        await super().stop()
