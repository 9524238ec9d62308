"""Wake on request: a request for an elastic model with no ready replica is held while the model wakes.

A model with a scaling policy (`spec.scaling`) may have no ready replica because it scaled to zero or sleeps.
Its first request is then not refused: this process holds it (bounded by `gateway.wake_wait_s`, at most
`gateway.max_held_requests` at once), asks for a wake by creating `/nebula/wake/<model>` where none is (the
scheduler leader acts on it and deletes it), and sends it on as usual once the replica table has a ready
replica. Many requests arriving together cause one wake: in this process one ask per model at a time
(single-flight), across processes etcd's create-if-absent. The waiting is on the replica table's change event,
set on each update of the instances' mirror: no polling. A model that is not elastic never comes here.

A hold that runs out is 503 `model_waking` with Retry-After, in the client's error shape; a held stream may
have started its answer to keep the connection alive meanwhile (wake_stream.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nebula.core.config import GatewayConfig
from nebula.core.elastic import WakeRequest
from nebula.core.routing import Replica
from nebula.errors import TemporaryError
from nebula.services.gateway.load import Clock
from nebula.services.gateway.load_report import LoadAccounting
from nebula.services.gateway.metrics import Children
from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.wake_stream import HeldStream
from nebula.services.http.errors import ApiError
from nebula.services.http.reply import Reply

log = logging.getLogger(__name__)

# A client that wants a plain 503 rather than a started stream while its model wakes says so.
KEEPALIVE_HEADER = "X-Nebula-Wake-Keepalive"
_OFF = frozenset({"0", "off", "false", "no"})
# Seconds between tries of a wake request that etcd did not take (unreachable): the hold goes on meanwhile.
ASK_RETRY_S = 1.0
SYNC_POLL_S = 0.2  # how often an ask made before the replica table's first listing looks again
HOLD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)

Send = Callable[[Reply], Awaitable[None]]
Eligible = Callable[[Replica], bool]
AskWake = Callable[[WakeRequest], Awaitable[bool]]


class WakeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.held = Children(Gauge(
            "nebula_gateway_held_requests", "Requests held while their elastic model wakes.", ["model"],
            registry=registry))
        self.wakes = Children(Counter(
            "nebula_gateway_wakes_requested", "Wake requests this gateway created (/nebula/wake/<model>; one per "
            "wake, whatever the number of held requests).", ["model"], registry=registry))
        self.hold_time = Children(Histogram(
            "nebula_gateway_wake_hold_seconds", "Time a request was held for its model to wake, by outcome: ready "
            "(sent on), timeout (503 model_waking), gone (the client left).", ["model", "outcome"],
            buckets=HOLD_BUCKETS, registry=registry))


def waking_error(model: str, waited_s: float, retry_after_s: int) -> ApiError:
    return ApiError(503, f"model '{model}' is waking up (scaled to zero or asleep) and had no ready replica "
                    f"after {waited_s:.0f}s; retry in {retry_after_s}s (`nebula status` shows its replicas)",
                    code="model_waking", headers={"Retry-After": str(retry_after_s)})


def keepalive_wanted(headers: Mapping[str, str], streaming: bool, keepalive_s: float) -> bool:
    """Whether a held request may get its SSE answer started early: a stream, keep-alive configured, and the
    client did not opt out."""
    return streaming and keepalive_s > 0 and headers.get(KEEPALIVE_HEADER, "").strip().lower() not in _OFF


class Waker:
    """Holds requests for waking models, asks for each wake once, and sends them on when a replica is ready."""

    def __init__(self, cfg: GatewayConfig, table: ReplicaTable, acct: LoadAccounting, ask: AskWake,
                 metrics: WakeMetrics, reporter: str = "", clock: Clock = time.monotonic,
                 wall: Clock = time.time) -> None:
        self._cfg = cfg
        self._table = table
        self._acct = acct
        self._ask_wake = ask
        self._metrics = metrics
        self._reporter = reporter
        self._clock = clock
        self._wall = wall
        self._asking: dict[str, asyncio.Task[None]] = {}  # model -> this process's one ask for its wake

    def waking(self, model: str) -> bool:
        """True while this process holds requests for `model`."""
        return self._acct.held.get(model, 0) > 0

    async def serve(self, model: str, path: str, streaming: bool, headers: Mapping[str, str], reply: Reply,
                    send: Send, eligible: Eligible | None = None) -> None:
        """`send(reply)` once `model` has a ready replica (for which `eligible` holds, if given: one that has
        loaded the LoRA adapter asked for): at once when it has one, else after holding.

        Raises ApiError 503 model_waking when the hold runs out or too many are held already (unless the held
        stream's answer had started: then the stream ends with that error as its last event)."""
        if self._table.has_candidate(model, eligible=eligible):
            if self._asking:
                self._asking.pop(model, None)  # awake: the next time it has no replica is another wake
            await self._send(model, send, reply)
            return
        cfg = self._cfg
        retry_after = max(1, round(min(cfg.wake_wait_s, 30.0)))
        if self._acct.held_total() >= cfg.max_held_requests:
            self._ask_once(model)  # refused, but the model still wakes for the next requests
            raise ApiError(503, f"model '{model}' is waking up and this gateway holds as many requests as it may "
                           f"(gateway.max_held_requests = {cfg.max_held_requests}); retry in {retry_after}s",
                           code="model_waking", headers={"Retry-After": str(retry_after)})
        keepalive = keepalive_wanted(headers, streaming, cfg.wake_keepalive_s)
        started = self._clock()
        stream: HeldStream | None = None
        outcome = "gone"
        try:
            with self._acct.holding(model):
                self._metrics.held(model).inc()
                try:
                    self._ask_once(model)
                    stream = await self._wait(model, path, started + cfg.wake_wait_s, reply if keepalive else None,
                                              eligible)
                    outcome = "ready" if self._table.has_candidate(model, eligible=eligible) else "timeout"
                finally:
                    self._metrics.held(model).dec()
                    self._metrics.hold_time(model, outcome).observe(max(0.0, self._clock() - started))
        finally:
            self._settle(model)
        if outcome != "ready":
            error = waking_error(model, self._clock() - started, retry_after)
            if stream is None:
                raise error
            await stream.fail(error)
            return
        if stream is None:
            await self._send(model, send, reply)
            return
        try:
            await self._send(model, send, stream)
        except ApiError as e:  # the status went out with the stream's head: the error is its last event
            await stream.fail(e)

    async def _send(self, model: str, send: Send, reply: Reply) -> None:
        self._acct.begin(model)
        try:
            await send(reply)
        finally:
            self._acct.end(model)

    async def _wait(self, model: str, path: str, deadline: float, keepalive: Reply | None,
                    eligible: Eligible | None) -> HeldStream | None:
        """Wait for a ready (and eligible) replica of `model` until `deadline`; with a `keepalive` reply, start its
        stream after the first keep-alive interval and send a comment each one after. The started stream, if any."""
        stream: HeldStream | None = None
        while not self._table.has_candidate(model, eligible=eligible):
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            wait = min(remaining, self._cfg.wake_keepalive_s) if keepalive is not None else remaining
            if await self._table.wait_for_replica(model, wait, eligible):
                break
            if keepalive is not None and deadline - self._clock() > 0:
                if stream is None:
                    stream = HeldStream(keepalive, path)
                    await stream.begin()
                await stream.keepalive(model)
        return stream

    def _ask_once(self, model: str) -> None:
        """Ask for `model`'s wake unless this process asked already for the requests it holds now."""
        if model not in self._asking:
            self._asking[model] = asyncio.create_task(self._ask(model), name=f"gateway-wake {model}")

    def _settle(self, model: str) -> None:
        """After a hold: once none is held for `model` any more, its wake is over for this process (a later
        request with still no ready replica asks again; create-if-absent keeps that to one request while the
        scheduler has not acted on the last)."""
        if self._acct.held.get(model, 0) <= 0:
            task = self._asking.pop(model, None)
            if task is not None and not task.done():
                task.cancel()

    async def _ask(self, model: str) -> None:
        # Just started, the table may not know the replicas yet: no wake for a model that is awake.
        while not self._table.synced:
            if await self._table.wait_for_replica(model, SYNC_POLL_S):
                return
        while True:
            try:
                created = await self._ask_wake(WakeRequest(model=model, at=self._wall(), by=self._reporter))
            except TemporaryError as e:
                log.warning("wake request for model %s not written (%r); trying again in %.0fs", model, e,
                            ASK_RETRY_S)
                await asyncio.sleep(ASK_RETRY_S)
                continue
            except Exception:
                log.exception("wake request for model %s failed", model)
                return
            if created:
                self._metrics.wakes(model).inc()
                log.info("asked to wake model %s (requests held, no ready replica)", model)
            return
