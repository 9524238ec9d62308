"""One gRPC channel at a time to one etcd member, with deadlines, failover and re-authentication for every call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
from aetcd import rpc

from nebula.adapters.etcd_wire import REAUTH_CODE, translate
from nebula.adapters.timeouts import timeout
from nebula.core.store import StoreUnavailableError

# The store's name, so that log filters on it (journal field LOGGER) keep matching after the split.
log = logging.getLogger("nebula.adapters.etcd")

T = TypeVar("T")

_KEEPALIVE_TIME_MS = 10_000
_KEEPALIVE_TIMEOUT_MS = 5_000
# gRPC's default reconnect backoff grows to 120 s: far too slow to notice etcd coming back.
_MAX_RECONNECT_BACKOFF_MS = 2_000
# The asyncio guard fires only if gRPC's own deadline somehow did not.
_GUARD_MARGIN_S = 0.5

# Codes that mean "this member may be gone": switch endpoint.
_FAILOVER_CODES = frozenset({rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED, rpc.StatusCode.INTERNAL})


@dataclass(frozen=True)
class EtcdSecurity:
    """TLS material (PEM bytes, read by the caller) and credentials. TLS is on for https:// endpoints."""

    ca: bytes | None = None  # None: the system's CAs
    cert: bytes | None = None  # client certificate chain, with `key`, for etcd's --client-cert-auth
    key: bytes | None = None
    user: str = ""
    password: str = ""


@dataclass(frozen=True)
class Client:
    """One gRPC channel to one endpoint, its stubs, and the auth token every call carries (if any)."""

    channel: Any
    metadata: tuple[tuple[str, str], ...] | None
    kvstub: Any
    leasestub: Any
    maintenancestub: Any

    async def close(self) -> None:
        await self.channel.close()


@dataclass(frozen=True)
class Conn:
    """One client and the generation it belongs to."""

    client: Client
    generation: int
    endpoint: str


def _parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"etcd endpoint must look like http://host:port or https://host:port, got {endpoint!r}")
    return parts.scheme, parts.hostname, parts.port


def cancellations() -> int:
    """The current task's cancellation requests not yet taken back (0 outside a task)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def cancelled_by_caller(since: int) -> bool:
    """Tell a real cancellation of our task from gRPC's: closing a channel (failover) makes every RPC
    still running on it raise asyncio.CancelledError in its caller, which is a connection loss. `since`:
    cancellations() when the call began, so that in a task already stopping (a store's last writes in a
    `finally` after SIGTERM) a closed channel is still a connection loss and only a new cancellation is one."""
    return cancellations() > since


class EtcdConnection:
    """The endpoints of one etcd cluster and the channel to the member that the next call goes to."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float, security: EtcdSecurity | None) -> None:
        if not endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        parsed = [_parse_endpoint(e) for e in endpoints]
        schemes = {scheme for scheme, _, _ in parsed}
        if len(schemes) > 1:
            raise ValueError("etcd endpoints must all be http:// or all https://")
        self._scheme = schemes.pop()
        self._endpoints = [(host, port) for _, host, port in parsed]
        self._security = security or EtcdSecurity()
        if bool(self._security.user) != bool(self._security.password):
            raise ValueError("etcd auth needs both a user and a password")
        self._opening = asyncio.Lock()
        self.timeout = timeout
        self._index = 0
        self._generation = 0
        self._conn: Conn | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint the next call goes to."""
        host, port = self._endpoints[self._index]
        return f"{self._scheme}://{host}:{port}"

    async def current(self) -> Conn:
        if self._closed:
            raise RuntimeError("EtcdStore is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("EtcdStore used from a second event loop: create one store per loop")
        if self._conn is None:
            async with self._opening:  # one channel (and one Authenticate) even when many calls start at once
                if self._conn is None:
                    endpoint = self.endpoint
                    client = await self._open(*self._endpoints[self._index])
                    self._conn = Conn(client, self._generation, endpoint)
        return self._conn

    async def _open(self, host: str, port: int) -> Client:
        options = [
            ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
            # etcd's server policy forbids pings while no stream is open.
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
        ]
        sec = self._security
        if self._scheme == "https":
            creds = grpc.ssl_channel_credentials(root_certificates=sec.ca, private_key=sec.key,
                                                 certificate_chain=sec.cert)
            channel = rpc.secure_channel(f"{host}:{port}", creds, options=options)
        else:
            channel = rpc.insecure_channel(f"{host}:{port}", options=options)
        metadata = None
        if sec.user:
            metadata = (("token", await self._authenticate(channel)),)
        # Building the channel and stubs does no network I/O; only Authenticate talks (under a deadline).
        return Client(channel, metadata, rpc.KVStub(channel), rpc.LeaseStub(channel), rpc.MaintenanceStub(channel))

    async def _authenticate(self, channel: Any) -> str:
        request = rpc.AuthenticateRequest(name=self._security.user, password=self._security.password)
        where = self.endpoint
        try:
            async with timeout(self.timeout + _GUARD_MARGIN_S):
                response = await rpc.AuthStub(channel).Authenticate(request, timeout=self.timeout)
            return str(response.token)
        except TimeoutError as exc:
            await self._discard(channel, next_endpoint=True)
            raise StoreUnavailableError(f"etcd {where} did not authenticate in {self.timeout}s") from exc
        except rpc.AioRpcError as exc:
            await self._discard(channel, next_endpoint=exc.code() in _FAILOVER_CODES)
            raise translate(exc) from exc
        except BaseException:
            await self._discard(channel, next_endpoint=False)
            raise

    async def _discard(self, channel: Any, *, next_endpoint: bool) -> None:
        """Drop a channel that never became the connection (its Authenticate failed)."""
        if next_endpoint:
            self._generation += 1
            self._index = (self._index + 1) % len(self._endpoints)
        await self._close_client(Client(channel, None, None, None, None))

    async def failover(self, conn: Conn) -> None:
        """Drop `conn` and point at the next endpoint, unless another task already did."""
        if self._conn is not conn:
            return
        self._conn = None
        self._generation += 1
        self._index = (self._index + 1) % len(self._endpoints)
        log.warning("etcd endpoint %s failed; next calls go to %s", conn.endpoint, self.endpoint)
        await self._close_client(conn.client)

    async def _close_client(self, client: Any) -> None:
        # Closing cancels the channel's RPCs (watches on it fail over too); never let it hang. A service closes its
        # store while stopping, in its task's `finally`, where this timeout (unlike 3.11's asyncio.timeout) still
        # ends in TimeoutError and the rest of the stop goes on.
        try:
            async with timeout(self.timeout):
                await client.close()
        except TimeoutError:
            log.debug("closing etcd client took over %s s; given up", self.timeout)
        except Exception as exc:  # closing a broken channel may fail in many ways; it is gone anyway
            log.debug("closing etcd client failed: %r", exc)

    async def call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run one RPC on the current connection, translating failures into our error types."""
        stopping_already = cancellations()
        for attempt in (1, 2):
            conn = await self.current()
            try:
                # timeout, not wait_for: the RPC is awaited in the caller's own task, so a cancellation arriving
                # in the turn the RPC ends is raised here, where Python 3.11's wait_for returned the result and
                # dropped it (gh-86296; a lease's keepalive loop then never stopped). Its deadline is a failover
                # in a stopping task too (a store's last writes in a `finally`), unlike 3.11's asyncio.timeout.
                async with timeout(self.timeout + _GUARD_MARGIN_S):
                    return await op(conn.client)
            except TimeoutError as exc:
                await self.failover(conn)
                raise StoreUnavailableError(f"etcd {conn.endpoint} did not answer in {self.timeout}s") from exc
            except rpc.AioRpcError as exc:
                if exc.code() in _FAILOVER_CODES or exc.code() == REAUTH_CODE:
                    await self.failover(conn)
                if exc.code() == REAUTH_CODE and self._security.user and attempt == 1:
                    log.info("etcd auth token of %s expired; authenticating again", conn.endpoint)
                    continue
                raise translate(exc) from exc
            except asyncio.CancelledError:
                if cancelled_by_caller(since=stopping_already):
                    raise
                raise StoreUnavailableError(f"etcd {conn.endpoint}: connection closed during the call") from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._close_client(conn.client)
