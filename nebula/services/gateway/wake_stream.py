"""A held stream: the SSE answer of a `stream: true` request, started while its model wakes.

A request held for long with nothing on its connection looks dead to proxies (nginx's proxy_read_timeout and
most load balancers' idle timeouts are 60 s) and to people. So once a held stream has waited
`gateway.wake_keepalive_s`, the gateway starts its answer (200, text/event-stream) and sends an SSE comment
line every interval: `: waking <model>`. The SSE standard has clients ignore lines that start with ':', and
the SDKs do (openai's and anthropic's SSEDecoder return no event for them).

Once the model is ready the engine's answer follows on the same stream: `HeldStream` is the Reply the forward
writes to, which keeps the head already sent and passes the body through. A failure after the head went out
cannot change the status any more, so it ends the stream with an error event in the client's shape, which
both SDKs raise as an error: OpenAI's `data: {"error": {...}}`, Anthropic's `event: error` with
`{"type": "error", "error": {...}}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from nebula.services.http.errors import ApiError, ErrorShape, shape_for_path
from nebula.services.http.reply import Reply

SSE_HEADERS = (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"))


def comment(model: str) -> bytes:
    return f": waking {model}\n\n".encode()


def error_event(shape: ErrorShape, body: bytes) -> bytes:
    """The SSE event that carries an error `body` (already in the client's JSON shape)."""
    data = body.replace(b"\n", b" ")
    if shape is ErrorShape.ANTHROPIC:
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


def _error_body(status: int, body: bytes, path: str) -> bytes:
    """An engine's error answer as an error event's data: its own JSON when it has the client's shape, else an
    error of that shape naming the status."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return body
    text = body.decode("utf-8", "replace")[:500] or f"the engine answered {status}"
    return ApiError(status, text, code="upstream_error").for_path(path).body()


class HeldStream:
    """The Reply for a held stream's forward, on top of the client's reply (whose head `begin` sends)."""

    __slots__ = ("_ended", "_error_body", "_error_status", "_path", "_reply")

    def __init__(self, reply: Reply, path: str) -> None:
        self._reply = reply
        self._path = path
        self._error_status = 0  # the engine's status when it answered an error, whose body we gather
        self._error_body = bytearray()
        self._ended = False

    async def begin(self) -> None:
        await self._reply.start(200, "", SSE_HEADERS)

    async def keepalive(self, model: str) -> None:
        await self._reply.write(comment(model))

    async def fail(self, error: ApiError) -> None:
        """End the stream with `error` as an error event (the status is out already)."""
        await self._finish(error.for_path(self._path).body())

    async def _finish(self, body: bytes) -> None:
        if self._ended:
            return
        self._ended = True
        await self._reply.write(error_event(shape_for_path(self._path), body))
        await self._reply.end()

    # -- Reply, for the forward: the head is out, so the engine's head is dropped and its body follows --------

    @property
    def status(self) -> int:
        return self._reply.status

    async def send(self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        if status != 200:
            await self._finish(_error_body(status, body, self._path))
            return
        await self._reply.write(body)
        self._ended = True
        await self._reply.end()

    async def start(self, status: int, reason: str, headers: Iterable[tuple[str, str]]) -> None:
        self._error_status = 0 if status == 200 else status

    async def write(self, data: bytes) -> None:
        if self._error_status:
            self._error_body += data[:65536 - len(self._error_body)]
            return
        await self._reply.write(data)

    async def end(self) -> None:
        if self._error_status:
            await self._finish(_error_body(self._error_status, bytes(self._error_body), self._path))
            return
        self._ended = True
        await self._reply.end()

    def abort(self) -> None:
        self._reply.abort()
