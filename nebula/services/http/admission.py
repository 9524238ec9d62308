"""Which connections the data-plane server (fastserver.py) takes, and for how long each may take its time.

Why: with the unit's default 1,024 open files, about a thousand idle connections used to exhaust the
gateway's descriptors; accept() then failed (asyncio pauses accepting for a second each time) and /healthz
timed out with everything else. Now:

- a global cap (`max_connections`, derived from the open-file limit unless configured) and a per-client
  cap (`max_per_ip`; IPv6 clients counted by their /64, which one host usually holds whole) keep the
  descriptors in hand. A connection handed to aiohttp still counts until it closes.
- At the cap, the connection idle longest (waiting for a request, nothing of one received) is closed to make
  room: an idle flood cannot lock new clients out, and the idle ones are what costs least to lose.
- With nothing idle, a few connections over the cap (`reserve`) are taken for the operator's paths only
  (/healthz and /metrics at the gateway): a flood must not blind the health check and the metrics that
  would show it. Their first request must come quickly; any other request there gets 503 in the OpenAI
  shape with `Connection: close` and Retry-After, which a well-behaved client understands.
- Beyond that (and over a client's own cap) a connection is accepted and closed at once, without a word:
  the cheapest refusal there is (no read, no write, no timer), and a client that floods is owed nothing.
  Each refusal is counted (ConnectionEvents, the gateway's metrics).

Deadlines (per connection; the server's sweep enforces them, one timer for all): the whole head
(`header_timeout_s`, from the connection's start or a later request's first byte), the whole body
(`body_timeout_s`, from the end of its head), the whole request (`request_timeout_s`, from the end of the
head to the last byte of the answer) and a write the client does not read (`write_timeout_s`). A trickle
of bytes extends none of them (slow-loris).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import resource
from dataclasses import dataclass
from typing import Protocol

RESERVE = 32  # connections over the cap for the operator's paths: a few probes and scrapes at a time
RESERVE_HEAD_S = 5.0  # a reserve connection's request must come this quickly
RESERVE_LIFETIME_S = 15.0  # and be over within this (aiohttp would otherwise keep it alive 75 s)
FD_HEADROOM = 256  # descriptors left for the rest of the process: etcd, the load poll, logs, epoll


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 0  # 0: no cap
    max_per_ip: int = 0  # 0: no cap
    reserve: int = RESERVE
    header_timeout_s: float = 20.0
    body_timeout_s: float = 120.0
    write_timeout_s: float = 60.0
    request_timeout_s: float = 660.0


class ConnectionEvents(Protocol):
    """What the server tells its owner about connections it refused or cut (the gateway counts them)."""

    def refused(self, reason: str) -> None:
        """A connection closed at accept: 'max_connections' or 'per_ip'; 'reserve_path' for a request
        refused with 503 on a reserve connection."""

    def reaped(self) -> None:
        """An idle connection closed to make room for a new one."""

    def cut(self, deadline: str) -> None:
        """A connection cut at a deadline: 'header', 'body', 'request' or 'write'."""


class NoEvents:
    def refused(self, reason: str) -> None:
        return None

    def reaped(self) -> None:
        return None

    def cut(self, deadline: str) -> None:
        return None


def client_key(peer: object) -> str:
    """Whose connection this is, for the per-client cap: the IPv4 address, an IPv6 address's /64 (a host
    gets a whole /64, so counting /128s would let one host open unlimited connections), '' when unknown."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return ""  # a Unix socket, or a transport that does not say
    ip = peer[0]
    if ":" not in ip or ip.startswith("::ffff:"):
        return ip
    try:
        return str(ipaddress.IPv6Network(f"{ip.partition('%')[0]}/64", strict=False))
    except ValueError:
        return ip


class Ticket:
    """One counted connection; given back exactly once, by whoever holds the connection when it ends."""

    __slots__ = ("client", "live")

    def __init__(self, client: str) -> None:
        self.client = client
        self.live = True


class Census:
    """Open connections, in all and per client, against ConnectionLimits."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0
        self._per_client: dict[str, int] = {}  # only clients with a connection open: bounded by `open`

    def client_full(self, client: str) -> bool:
        cap = self.limits.max_per_ip
        return bool(cap and client and self._per_client.get(client, 0) >= cap)

    def full(self) -> bool:
        cap = self.limits.max_connections
        return bool(cap and self.open >= cap)

    def reserve_full(self) -> bool:
        return self.open >= self.limits.max_connections + self.limits.reserve

    def take(self, client: str) -> Ticket:
        self.open += 1
        if client:
            self._per_client[client] = self._per_client.get(client, 0) + 1
        return Ticket(client)

    def give_back(self, ticket: Ticket) -> None:
        if not ticket.live:
            return
        ticket.live = False
        self.open -= 1
        if ticket.client:
            left = self._per_client[ticket.client] - 1
            if left:
                self._per_client[ticket.client] = left
            else:
                del self._per_client[ticket.client]


class HandedOver(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol once a connection is aiohttp's, so that it keeps
    counting until it closes (and a reserve connection closes at its expiry). One call more per read, on
    paths off the hot one."""

    __slots__ = ("_census", "_inner", "_ticket", "_transport", "expires_at")

    def __init__(self, inner: asyncio.Protocol, transport: asyncio.BaseTransport, census: Census, ticket: Ticket,
                 expires_at: float = math.inf) -> None:
        self._inner = inner
        self._transport = transport
        self._census = census
        self._ticket = ticket
        self.expires_at = expires_at

    def close(self) -> None:
        self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._census.give_back(self._ticket)
        self._inner.connection_lost(exc)


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard one (the unit's LimitNOFILE= sets both; a
    process started otherwise gets a soft 1,024 under a far higher hard limit) and return it. Nothing asks
    for a low soft limit here: asyncio polls with epoll, never select()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # a sandbox that refuses: keep the soft limit, and derive the cap from it
    return soft


def derived_max_connections(open_files: int) -> int:
    """The connection cap a process with `open_files` descriptors can keep: each client connection may hold
    an engine connection too, so half of what is left after FD_HEADROOM, less the reserve."""
    return max(16, (open_files - FD_HEADROOM) // 2 - RESERVE)


def open_file_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
