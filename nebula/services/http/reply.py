"""How a handler answers, whatever server carries the request: the `Reply` protocol, and its aiohttp form.

The gateway's OpenAI handlers are written against `Reply` so that one handler serves both of the
gateway's servers: the data-plane server (fastserver.py) for plain requests to the OpenAI paths, and
aiohttp for everything else (a connection that aiohttp took over keeps using it). Headers given to a
reply are end-to-end ones; the reply frames the body itself (Content-Length or chunked).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from aiohttp import web

JSON_HEADERS = (("Content-Type", "application/json"),)


class Reply(Protocol):
    @property
    def status(self) -> int:
        """The status sent, or 0 while nothing was."""

    async def send(self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        """The whole answer at once ("" as `reason`: the standard phrase)."""

    async def start(self, status: int, reason: str, headers: Iterable[tuple[str, str]]) -> None:
        """The head of an answer whose body follows through `write`, ended by `end`."""

    async def write(self, data: bytes) -> None:
        """A piece of the body; raises ConnectionResetError when the client went away."""

    async def end(self) -> None:
        """The body is complete."""

    def abort(self) -> None:
        """Drop the connection, so the client sees a started answer broken off, never a complete one."""


async def send_json(reply: Reply, payload: Any, status: int = 200) -> None:
    await reply.send(status, "", JSON_HEADERS, json.dumps(payload).encode())


class AiohttpReply:
    """A Reply through aiohttp: `response` is what the aiohttp handler returns afterwards."""

    __slots__ = ("_request", "response")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None

    @property
    def status(self) -> int:
        return self.response.status if self.response is not None else 0

    async def send(self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        resp = web.Response(status=status, reason=reason or None, body=body)
        for k, v in headers:
            resp.headers.add(k, v)
        self.response = resp

    async def start(self, status: int, reason: str, headers: Iterable[tuple[str, str]]) -> None:
        resp = web.StreamResponse(status=status, reason=reason or None)
        for k, v in headers:
            resp.headers.add(k, v)
        self.response = resp
        await resp.prepare(self._request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None, "write before start"
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None, "end before start"
        await self.response.write_eof()

    def abort(self) -> None:
        if self._request.transport is not None:
            self._request.transport.abort()

    def answer(self) -> web.StreamResponse:
        """The response for aiohttp to finish; a handler that did not reply is a bug."""
        if self.response is None:
            raise RuntimeError("the handler returned without replying")
        return self.response
