"""The answer, and the log line, for a malformed request on a connection the data-plane server handed to
aiohttp.

After a hand-over (fastserver.py), aiohttp parses every later request on that connection itself. One it
cannot parse reaches RequestHandler.handle_error, which answers it in text/plain and logs the parser's
traceback at ERROR. The data-plane server answers the same fault in the client's error shape, without a
traceback; a hostile client repeating it must not fill the journal with tracebacks either. So the handed
connections are served by JsonErrorRequestHandler: the same handler, whose errors are answered the way
`refusal` answers them on the data-plane server, and logged as one WARNING line naming the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nebula.services.http.errors import ApiError, refusal

log = logging.getLogger(__name__)


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering what it cannot serve in the gateway's error shape."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # part of an answer went out: no other can follow (as aiohttp)
            raise ConnectionError("an answer was sent in part; no error answer can follow")
        if isinstance(exc, HttpProcessingError):
            # aiohttp's message spans lines (the bytes, a caret under the fault): one line here.
            reason = " ".join(str(exc.message).split())[:200]
            log.warning("refused a malformed request from %s: %d %s", request.remote, status, reason)
            error = refusal(status, f"malformed request: {reason}")
        elif status == 504:
            log.warning("request from %s timed out in its handler", request.remote)
            error = ApiError(504, "the request timed out", code="timeout")
        else:  # a bug outside the error middleware: the traceback is for the log, never the client
            log.error("bug while handling a request from %s", request.remote, exc_info=exc)
            error = ApiError(500, "internal error (logged by the server)", code="internal_error")
        response = error.response()
        response.force_close()
        return response


def json_error_handlers(server: web.Server) -> Callable[[], JsonErrorRequestHandler]:
    """A protocol factory like `server` itself (aiohttp's web.Server), whose handlers answer errors in the
    gateway's shape.

    web.Server.__call__ builds RequestHandler(server, loop=..., **the settings it was made with); this builds
    the subclass with the same settings, which web.Server keeps (unpublished) in `_kwargs`.
    """
    settings: dict[str, Any] = dict(getattr(server, "_kwargs", {}))

    def make() -> JsonErrorRequestHandler:
        return JsonErrorRequestHandler(server, loop=asyncio.get_running_loop(), **settings)

    return make
