"""What the data-plane server (fastserver.py) and its routes share: a request read from a connection, the route
that answers it, the router that picks the route, the admission check that runs from its head, and a path's
body limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from nebula.services.http.connection_reply import ConnectionReply


class FastRequest:
    # A plain class, not a dataclass: compiled (scripts/compile_data_path.py), a dataclass's generated
    # __init__ stays bytecode, 170-180 ns where this takes 20-40.
    __slots__ = ("body", "context", "extra_headers", "headers", "method", "path", "release", "target")

    def __init__(self, method: str, target: str, path: str, headers: CIMultiDict[str], body: bytes) -> None:
        self.method = method
        self.target = target  # path and query, as sent
        self.path = path
        self.headers = headers
        self.body = body
        # Added to whatever answer this request gets, errors included (the gateway's X-Request-ID).
        self.extra_headers: list[tuple[str, str]] = []
        # What the server's `admit` learned of the request (the gateway: the caller's API key).
        self.context: Any = None
        # Set by `admit` when it holds something for the request (the gateway: its key's concurrency slot);
        # the server calls it once, when the request ends however it ends.
        self.release: Callable[[], None] | None = None

    def finish(self) -> None:
        """Give back what `admit` holds for it (calls `release` at most once)."""
        release, self.release = self.release, None
        if release is not None:
            release()


Route = Callable[[FastRequest, ConnectionReply], Awaitable[None]]
# (method, path) -> the route that serves it here, or None: aiohttp takes the connection.
Router = Callable[[str, str], Route | None]
# Checks a routed request from its head, before its body is read: raises (ApiError) to refuse it, may set
# its `context`, `extra_headers` and `release` for the route.
Admit = Callable[[FastRequest], None]


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """The largest body a path takes, and the setting that raises it (named in the 413)."""

    max_bytes: int
    setting: str


async def _refused(request: FastRequest, reply: ConnectionReply) -> None:
    # Mostly a marker: a refused request is answered by its connection at once. Run only when the client is
    # not reading its answers, so that the refusal (through _answer) waits for it like any answer.
    raise request.context


REFUSED: Route = _refused
