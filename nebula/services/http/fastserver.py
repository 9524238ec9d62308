"""The gateway's data-plane server: HTTP/1.1 on asyncio Protocols for the OpenAI paths, aiohttp for the rest.

Every connection starts here. A request whose method and path the router knows, with a plain body
(Content-Length framing), is read and answered by this server: one parse of the head, one task per
request, one write per answer (head and body together), chunked framing for a streamed body. Anything
else (the admin API, /metrics, a chunked upload, an Upgrade, a path the router does not know) makes the
connection aiohttp's: the bytes it holds from that request's first byte on are handed to an aiohttp
protocol, which serves the connection from then on. aiohttp serves the OpenAI paths too, so a connection
it took over loses nothing but speed.

Why: with its engine hop on a lean client (adapters/upstream_http.py), aiohttp's server side was the
largest part of the gateway's CPU per request (its request and response objects, router, middleware
chain and writer), as much as the gateway's own work.

Behaviour an HTTP/1.1 server owes its clients, as aiohttp gives it:
- keep-alive, and pipelined requests answered in order; Connection: close and HTTP/1.0 respected;
- `Expect: 100-continue` answered before the body is read;
- a body over `max_body` (or its path's own `body_limits`) refused with 413 before it is read, a head
  over 64 KiB with 431, a malformed one with 400, all in the OpenAI error shape, then the connection closed;
- a client that goes away cancels its handler (as aiohttp's handler_cancellation), so the engine
  request is closed and the engine stops generating;
- writing waits while the client reads slowly (transport flow control), reading pauses while a
  pipelining client sends far ahead;
- a connection idle past `keepalive_s` (between requests, nothing of the next one received) is closed;
- caps on connections (in all, per client, a reserve for the operator's paths) and deadlines (the whole
  head, the whole body, the whole request, a write the client does not read): admission.py says which
  and why. A request's resources (the gateway: its key's concurrency slot, taken by `admit`) are given
  back through its `release` on every path: answered, refused, client gone, error, deadline;
- on shutdown, idle connections close at once, busy ones after their answer, the rest at the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from email.utils import formatdate

from nebula.services.http.admission import (
    RESERVE_LIFETIME_S,
    Census,
    ConnectionEvents,
    ConnectionLimits,
    HandedOver,
    NoEvents,
    Ticket,
    client_key,
)
from nebula.services.http.fastconnection import FastConnection
from nebula.services.http.fastrequest import Admit, BodyLimit, Router

log = logging.getLogger(__name__)

KEEPALIVE_S = 75.0  # aiohttp's default
Clock = Callable[[], float]


class FastServer:
    """The connections of one site and what they share: the router, aiohttp's protocol factory (for the
    connections it takes over), the limits and the connection census. Called, it makes a connection's
    protocol."""

    def __init__(
        self,
        router: Router,
        fallback: Callable[[], asyncio.BaseProtocol],
        max_body: int,
        keepalive_s: float = KEEPALIVE_S,
        admit: Admit | None = None,
        limits: ConnectionLimits | None = None,
        events: ConnectionEvents | None = None,
        reserve_paths: frozenset[str] = frozenset(),
        clock: Clock = time.monotonic,
        body_limits: Mapping[str, BodyLimit] | None = None,
    ) -> None:
        self.router = router
        self.admit = admit
        self.fallback = fallback
        self.max_body = max_body
        # Paths with a limit of their own (the gateway's uploads), checked from the head like max_body.
        self.body_limits: Mapping[str, BodyLimit] = body_limits or {}
        self.default_body_limit = BodyLimit(max_body, "gateway.max_body_bytes")
        self.keepalive_s = keepalive_s
        self.limits = limits or ConnectionLimits()
        self.events: ConnectionEvents = events or NoEvents()
        self.reserve_paths = reserve_paths
        self.clock = clock
        self.census = Census(self.limits)
        self.connections: set[FastConnection] = set()
        # Connections waiting for a request with nothing of it received, the longest idle first (a dict
        # keeps insertion order): the sweep stops at the first one not yet due, and at the cap the first
        # one makes room, both without a scan.
        self.idle: dict[FastConnection, None] = {}
        self.reserved: set[HandedOver] = set()  # reserve connections aiohttp serves, until their expiry
        self.closing = False
        self._all_closed = asyncio.Event()
        self._date = ""
        self._date_at = -1

    def __call__(self) -> FastConnection:
        return FastConnection(self)

    @property
    def open(self) -> int:
        """Connections open, those aiohttp serves included."""
        return self.census.open

    def sweep_interval(self) -> float:
        """How often `sweep` runs: a quarter of the shortest limit, between half a second and 5 s, so a
        deadline is kept to within a quarter of itself without a timer per connection."""
        lim = self.limits
        return min(
            5.0, max(0.5, min(self.keepalive_s, lim.header_timeout_s, lim.body_timeout_s, lim.write_timeout_s) / 4)
        )

    def date(self) -> str:
        """The Date header's value (RFC 9110 6.6.1), formatted once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at, self._date = now, formatdate(now, usegmt=True)
        return self._date

    def enter(self, conn: FastConnection, transport: asyncio.BaseTransport) -> Ticket | None:
        """Count a new connection in, making room by closing the longest idle one at the cap; None when it
        is refused (the caller closes it). Sets conn.reserve when it is taken from the reserve."""
        client = client_key(transport.get_extra_info("peername"))
        if self.census.client_full(client):
            self.events.refused("per_ip")
            return None
        if self.census.full():
            if self.idle:
                oldest = next(iter(self.idle))
                self.idle.pop(oldest)
                oldest.close()  # it stops counting now, not when its close is done
                self.events.reaped()
            elif self.reserve_paths and not self.census.reserve_full():
                conn.reserve = True
            else:
                self.events.refused("max_connections")
                return None
        return self.census.take(client)

    def forget(self, conn: FastConnection) -> None:
        self.connections.discard(conn)
        self.idle.pop(conn, None)
        if self.closing and not self.connections:
            self._all_closed.set()

    def hand_over(
        self, conn: FastConnection, transport: asyncio.Transport, ticket: Ticket, data: bytes | bytearray
    ) -> None:
        """Make aiohttp serve `conn`'s connection from the request in `data` (its first byte on); it still
        counts (through HandedOver) until it closes."""
        self.forget(conn)
        protocol = self.fallback()
        if isinstance(protocol, asyncio.Protocol):
            expires = self.clock() + RESERVE_LIFETIME_S if conn.reserve else math.inf
            handed = HandedOver(protocol, transport, self.census, ticket, expires)
            if conn.reserve:
                self.reserved.add(handed)
            transport.set_protocol(handed)
        else:  # not aiohttp's: nothing to stand between, so it stops counting here
            self.census.give_back(ticket)
            transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data and isinstance(protocol, asyncio.Protocol):
            protocol.data_received(bytes(data))

    def sweep(self, now: float) -> int:
        """Close the connections idle since before `now` - keepalive_s and cut those past a deadline at
        `now` (a monotonic time: the tests pass one ahead of the clock); how many."""
        cutoff = now - self.keepalive_s
        stale = []
        for conn in self.idle:
            if conn.idle_since is None or conn.idle_since >= cutoff:
                break
            stale.append(conn)
        for conn in stale:
            self.idle.pop(conn, None)
            conn.close()
        write_cutoff = now - self.limits.write_timeout_s
        overdue = [
            c
            for c in self.connections
            if c.deadline <= now or (c.blocked_since is not None and c.blocked_since <= write_cutoff)
        ]
        for conn in overdue:
            conn.cut(now)
        expired = [h for h in self.reserved if h.expires_at <= now]
        for handed in expired:
            self.reserved.discard(handed)
            handed.close()
        return len(stale) + len(overdue) + len(expired)

    async def keep_sweeping(self) -> None:
        """sweep every sweep_interval() until cancelled: one timer for all connections, where one per
        connection would be re-armed on every request."""
        while True:
            await asyncio.sleep(self.sweep_interval())
            self.sweep(self.clock())

    async def shutdown(self, timeout_s: float) -> None:
        """Close idle connections now and busy ones after their answer; abort what is left at the timeout."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            # asyncio.wait: it bounds the wait for the connections to close and tells, without raising, whether
            # they did; those still busy are aborted below either way.
            all_closed = asyncio.ensure_future(self._all_closed.wait())
            try:
                done, _ = await asyncio.wait([all_closed], timeout=timeout_s)
            finally:
                all_closed.cancel()
            if not done:
                log.warning(
                    "%d data-plane connections still busy after %.0f s; closing them", len(self.connections), timeout_s
                )
        for conn in list(self.connections):
            conn.abort()
