"""GET /ui/api/models/{name}/logs[?lines=N]: the console's live tail of a model's engine logs, across nodes.

An admin path (auth.py: /ui/api/ is the admin's): engine logs can hold prompts. The nodes come from the
gateway's mirror of instances, each agent's address and log token from its mirror of /nebula/log-access/
(no etcd read per stream or line); each node's agent is asked for its tail (adapters/agent_logs.py), and the
answers go to the browser as one server-sent-events stream:

- `start` {model, nodes}; `lines` [{node, instance, t, priority, message}, ...], the nodes' backlogs merged
  by time first (those that came within BACKLOG_WINDOW_S), then new lines as they come;
- `unavailable` {node, reason}: that node's tail failed or cannot open (tried again every RETRY_S, new lines
  only); the others go on;
- `expired` when the console's session ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from aiohttp import web

from nebula.adapters.timeouts import timeout
from nebula.core.engine_logs import LogAccess, LogLine, LogSourceError, requested_backlog
from nebula.core.log_tail import RETRY_S, merge_backlogs, tagged, tails_to_open
from nebula.services.cluster.mirror import MirrorState
from nebula.services.gateway import console_session as cs
from nebula.services.gateway.console import CONSOLE
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.errors import ApiError

log = logging.getLogger(__name__)

TICK_S = 1.0
BACKLOG_WINDOW_S = 1.0
KEEPALIVE_S = 15.0
MAX_STREAMS = 8  # log streams one gateway process serves at once (each holds a connection per node)
BATCH = 200  # lines per `lines` event
QUEUE = 2000

OpenTail = Callable[[LogAccess, str, int], AbstractAsyncContextManager[AsyncIterator[LogLine]]]


@dataclass
class ConsoleLogs:
    """The agents' log access records (the mirror's consumer), and how a tail on one is opened."""

    open_tail: OpenTail
    agents: dict[str, LogAccess] = field(default_factory=dict)
    max_streams: int = MAX_STREAMS
    streams: int = 0

    def update(self, state: MirrorState[LogAccess]) -> None:
        self.agents = {a.node: a for a in state.records.values()}


CONSOLE_LOGS = web.AppKey("console_logs", ConsoleLogs)


def _event(kind: str, data: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def model_logs(request: web.Request) -> web.StreamResponse:
    st, con, logs = request.app[GATEWAY], request.app[CONSOLE], request.app[CONSOLE_LOGS]
    name = request.match_info["name"]
    if name not in st.view.models and not st.table.nodes_of(name):
        raise ApiError(404, f"model '{name}' is not loaded", param="name", code="model_not_found")
    try:
        backlog = requested_backlog(request.query.get("lines"))
    except ValueError:
        raise ApiError(400, "lines must be a whole number", param="lines", code="invalid_value") from None
    if logs.streams >= logs.max_streams:
        raise ApiError(429, f"{logs.streams} log streams are open on this gateway (at most {logs.max_streams}); "
                       "close one", code="too_many_log_streams")
    token = request.cookies.get(cs.COOKIE)

    def session_ends() -> str:
        if not token:  # an admin key in a header: checked once, like any admin request
            return ""
        try:  # the session may expire, or its key be revoked, while the stream is open
            cs.check(con.secret, token, con.wall(), "GET", None, st.auth.by_id, st.auth.is_open)
        except cs.SessionError as e:
            return str(e)
        return ""

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    logs.streams += 1
    try:
        await response.prepare(request)
        await LogStream(response, logs, name, backlog, lambda: st.table.nodes_of(name), session_ends).run()
    except ConnectionResetError:  # the console went away: the usual end
        pass
    finally:
        logs.streams -= 1
    return response


Item = tuple[str, LogLine | str]  # (node, a line or why its tail ended)


class LogStream:
    def __init__(self, response: web.StreamResponse, logs: ConsoleLogs, model: str, backlog: int,
                 nodes: Callable[[], Collection[str]], session_ends: Callable[[], str]) -> None:
        self._response, self._logs, self._model, self._backlog = response, logs, model, backlog
        self._nodes, self._session_ends = nodes, session_ends
        self._queue: asyncio.Queue[Item] = asyncio.Queue(QUEUE)
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, float] = {}

    async def run(self) -> None:
        clock = asyncio.get_running_loop().time
        await self._response.write(b"retry: 3000\n\n" + _event("start", {"model": self._model,
                                                                           "nodes": sorted(self._nodes())}))
        try:
            self._open(clock())
            await self._backlogs(clock() + BACKLOG_WINDOW_S)
            last_write = last_check = clock()
            while True:
                lines = await self._take(TICK_S)
                if lines:
                    await self._response.write(_event("lines", lines))
                    last_write = clock()
                now = clock()
                if now - last_check >= TICK_S:
                    last_check = now
                    if why := self._session_ends():
                        await self._response.write(_event("expired", {"message": why}))
                        return
                    self._open(now)
                if now - last_write >= KEEPALIVE_S:
                    await self._response.write(b": keep-alive\n\n")
                    last_write = now
        finally:
            for task in self._tails.values():
                task.cancel()
            await asyncio.gather(*self._tails.values(), return_exceptions=True)

    def _open(self, now: float) -> None:
        self._tails = {n: t for n, t in self._tails.items() if not t.done()}
        for opening in tails_to_open(self._nodes(), self._tails, self._failed, now, RETRY_S):
            self._failed.pop(opening.node, None)
            self._tails[opening.node] = asyncio.create_task(
                self._read(opening.node, self._backlog if opening.backlog else 0),
                name=f"log tail {self._model} on {opening.node}")

    async def _read(self, node: str, backlog: int) -> None:
        access = self._logs.agents.get(node)
        if access is None:
            why = "its agent publishes no log access (an agent older than this gateway, or a bad record)"
        else:
            try:
                async with self._logs.open_tail(access, self._model, backlog) as lines:
                    async for line in lines:
                        await self._queue.put((node, line))
                why = "the agent ended the tail"
            except LogSourceError as e:
                why = str(e)
        self._failed[node] = asyncio.get_running_loop().time()  # before its task is seen done: no early reopen
        await self._queue.put((node, why))

    async def _backlogs(self, until: float) -> None:
        """The first lines from every node, merged by time, sent as one batch."""
        clock = asyncio.get_running_loop().time
        backlogs: dict[str, list[LogLine]] = {}
        ended: list[tuple[str, str]] = []
        while (left := until - clock()) > 0:
            try:
                async with timeout(left):
                    node, item = await self._queue.get()
            except TimeoutError:
                break
            if isinstance(item, str):
                ended.append((node, item))
            else:
                backlogs.setdefault(node, []).append(item)
        merged = merge_backlogs(backlogs, self._backlog)
        for start in range(0, len(merged), BATCH):
            await self._response.write(_event("lines", merged[start:start + BATCH]))
        for node, why in ended:
            await self._unavailable(node, why)

    async def _take(self, wait_s: float) -> list[dict[str, object]]:
        """The lines waiting (at most BATCH), waiting up to `wait_s` for the first; a node's end is sent as it comes."""
        try:
            async with timeout(wait_s):
                first = await self._queue.get()
        except TimeoutError:
            return []
        out: list[dict[str, object]] = []
        item: Item | None = first
        while item is not None and len(out) < BATCH:
            node, got = item
            if isinstance(got, str):
                if out:  # keep the order: the lines before it first
                    await self._response.write(_event("lines", out))
                    out = []
                await self._unavailable(node, got)
            else:
                out.append(tagged(node, got))
            item = self._queue.get_nowait() if not self._queue.empty() else None
        return out

    async def _unavailable(self, node: str, why: str) -> None:
        log.info("console: engine logs of %s on node %s unavailable: %s", self._model, node, why,
                 extra={"NEBULA_NODE": node, "NEBULA_MODEL": self._model})
        await self._response.write(_event("unavailable", {"node": node, "reason": why}))
