"""What aiohttp logs of a malformed request on a connection the data-plane server handed to it.

After a hand-over (fastserver.py), aiohttp parses every later request on that connection itself, and one it
cannot parse is logged by aiohttp's RequestHandler.handle_error as "Error handling request from <peer>", with
the parser's traceback, at ERROR. That is a client's fault, which the data-plane server answers without a
traceback; repeated by a hostile client it would fill the journal with tracebacks. MalformedRequestLog turns
such a record into one WARNING line naming the client and the fault; every other record passes unchanged.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

AIOHTTP_SERVER_LOGGER = "aiohttp.server"


class MalformedRequestLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            # aiohttp's message spans lines (the bytes, a caret under the fault): one line here.
            record.msg, record.args = "refused a malformed request from %s: %d %s", (
                peer, exc.code, " ".join(str(exc.message).split())[:200])
            record.exc_info = record.exc_text = None
        return True


def quiet_malformed_requests(logger: logging.Logger) -> None:
    """Add MalformedRequestLog to `logger` (aiohttp's server logger), once however often it is called."""
    if not any(isinstance(f, MalformedRequestLog) for f in logger.filters):
        logger.addFilter(MalformedRequestLog())
