"""GET /logs/engines?model=M[&lines=N] on the node agent's HTTP server: a model's engine log lines on this
node, the last N (default 200, at most 1000), then new ones as they come, as NDJSON (one LogLine a line; an
empty line every KEEPALIVE_S while quiet, so a caller that went away is noticed; a last `{"error": ...}` line
when the reader fails after the answer started).

Engine logs can hold prompts: the caller must present this agent's log token as a Bearer credential
(compared in constant time). The token is made at each start and published, under the agent's own lease, at
/nebula/log-access/<node> for the gateways, which serve the lines to admin sessions of the console only.
Engines run as another user and never see it. At most MAX_TAILS tails at once; more get 429.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from nebula.adapters.timeouts import timeout
from nebula.core.engine_logs import (
    MAX_TAILS,
    EngineLogSource,
    LogLine,
    LogSourceError,
    bearer_matches,
    requested_backlog,
)
from nebula.core.fields import validate_name
from nebula.errors import ValidationError

log = logging.getLogger(__name__)

LOGS_PATH = "/logs/engines"
KEEPALIVE_S = 15.0
QUEUE_LINES = 256  # read ahead of a slow caller; beyond that the reader waits (journalctl blocks on its pipe)


@dataclass
class EngineLogs:
    source: EngineLogSource
    token: str
    max_tails: int = MAX_TAILS
    keepalive_s: float = KEEPALIVE_S
    open: int = 0


ENGINE_LOGS = web.AppKey("engine_logs", EngineLogs)


def _refuse(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "code": code}}, status=status, headers=headers)


async def engine_logs(request: web.Request) -> web.StreamResponse:
    logs = request.app[ENGINE_LOGS]
    if not bearer_matches(request.headers.get("Authorization"), logs.token):
        return _refuse(401, "present this agent's log token (/nebula/log-access/<node>)", "unauthorized",
                       {"WWW-Authenticate": "Bearer"})
    try:
        model = validate_name(request.query.get("model", ""), "model")
        backlog = requested_backlog(request.query.get("lines"))
    except ValidationError as e:
        return _refuse(400, str(e), "invalid_value")
    except ValueError:
        return _refuse(400, "lines must be a whole number", "invalid_value")
    if logs.open >= logs.max_tails:
        return _refuse(429, f"{logs.open} log tails are open on this agent (at most {logs.max_tails})",
                       "too_many_tails")
    logs.open += 1
    try:
        return await _stream(request, logs, model, backlog)
    finally:
        logs.open -= 1


async def _stream(request: web.Request, logs: EngineLogs, model: str, backlog: int) -> web.StreamResponse:
    try:
        async with logs.source.tail(model, backlog) as lines:
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                                   "Cache-Control": "no-store"})
            await response.prepare(request)
            queue: asyncio.Queue[LogLine | str] = asyncio.Queue(QUEUE_LINES)
            pump = asyncio.create_task(_pump(lines, queue), name=f"log tail {model}")
            try:
                await _send(response, queue, logs.keepalive_s)
            except ConnectionResetError:  # the caller went away: the usual end
                pass
            finally:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            return response
    except LogSourceError as e:  # before the answer started: one error, the reader already ended
        log.warning("engine logs of %s unavailable: %s", model, e, extra={"NEBULA_MODEL": model})
        return _refuse(503, str(e), "logs_unavailable")


async def _pump(lines: AsyncIterator[LogLine], queue: asyncio.Queue[LogLine | str]) -> None:
    """The reader's lines into `queue`; its end as a string (why), "" when it just ended."""
    try:
        async for line in lines:
            await queue.put(line)
        await queue.put("")
    except LogSourceError as e:
        await queue.put(str(e) or "the log reader ended")


async def _send(response: web.StreamResponse, queue: asyncio.Queue[LogLine | str], keepalive_s: float) -> None:
    while True:
        try:
            async with timeout(keepalive_s):
                item = await queue.get()
        except TimeoutError:
            await response.write(b"\n")
            continue
        if isinstance(item, str):
            if item:
                await response.write(json.dumps({"error": item}).encode() + b"\n")
            return
        await response.write(json.dumps(item.to_dict(), separators=(",", ":")).encode() + b"\n")


def routes() -> list[web.RouteDef]:
    return [web.get(LOGS_PATH, engine_logs)]
