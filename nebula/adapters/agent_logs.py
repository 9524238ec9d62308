"""The gateway's client of a node agent's engine log tail (GET /logs/engines, services/agent/logs_api.py).

Each failure (unreachable, refused, a broken stream, an `{"error"}` line) is one LogSourceError naming why,
which the console shows for that node alone.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp

from nebula.core.engine_logs import MAX_RAW_LINE, LineSplitter, LogAccess, LogLine, LogSourceError
from nebula.errors import ValidationError

PATH = "/logs/engines"
CONNECT_TIMEOUT_S = 3.0
# The agent writes an empty line every 15 s while its engines are quiet: silence past this is a dead agent.
READ_TIMEOUT_S = 45.0


@contextlib.asynccontextmanager
async def agent_tail(http: aiohttp.ClientSession, access: LogAccess, model: str,
                     backlog: int) -> AsyncIterator[AsyncIterator[LogLine]]:
    """The lines of `model`'s engines on `access.node`, as its agent sends them, until the block ends (which
    closes the connection, and so ends the agent's reader)."""
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
    try:
        resp = await http.get(f"{access.scheme}://{access.address}{PATH}", timeout=timeout,
                              params={"model": model, "lines": str(backlog)},
                              headers={"Authorization": f"Bearer {access.token}", "Accept-Encoding": "identity"})
    except (TimeoutError, aiohttp.ClientError) as e:
        raise LogSourceError(f"agent at {access.address} unreachable ({type(e).__name__}{': ' if str(e) else ''}"
                             f"{e})") from None
    try:
        if resp.status != 200:
            raise LogSourceError(f"agent answered {resp.status}{_why(await _head(resp))}")
        yield _lines(resp)
    finally:
        resp.close()


async def _head(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.content.read(2048)
    except (TimeoutError, aiohttp.ClientError):
        return b""


def _why(body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f": {message}" if isinstance(message, str) else ""


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[LogLine]:
    splitter = LineSplitter(MAX_RAW_LINE)
    try:
        async for data in resp.content.iter_any():
            for raw in splitter.feed(data):
                if not raw.strip():
                    continue  # the agent's keep-alive
                try:
                    obj = json.loads(raw)
                    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
                        raise LogSourceError(obj["error"])
                    yield LogLine.from_dict(obj)
                except (ValueError, ValidationError, RecursionError):
                    continue  # not a line: one garbled line costs itself only
    except (TimeoutError, aiohttp.ClientError) as e:
        raise LogSourceError(f"the agent's stream broke ({type(e).__name__})") from None
    raise LogSourceError("the agent ended the tail")
