"""Forwarding a validated request to a READY replica of its model: the gateway's one data-plane hop.

The pick is least loaded with prefix affinity (nebula.core.routing over the ReplicaTable). Retries are
invisible to the client: a replica that refuses the connection (or answers 502/503 before any byte went
out) is excluded and another is tried, up to GatewayConfig.max_attempts. Once the response status is
sent the replica is committed; the body streams through untouched. Engine load comes from a background
poll of each READY replica's /metrics (load.py), never from the request path.

A client that goes away cancels the handler (both of the gateway's servers cancel a departed client's
handler), which closes the engine connection, and the engine aborts the request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple

from nebula.adapters.upstream_http import UpstreamDisconnected, UpstreamUnreachable
from nebula.adapters.upstream_response import UpstreamResponse
from nebula.core.routing import Replica
from nebula.services.gateway.exchange import Exchange
from nebula.services.gateway.state import GatewayState
from nebula.services.http.errors import ApiError, unavailable
from nebula.services.http.relay import RelayStats, UpstreamBroke, relay
from nebula.services.http.reply import Reply

log = logging.getLogger(__name__)

# Statuses an engine gives while it cannot take the request at all (starting, shutting down, overloaded
# proxy in front of it): safe to try elsewhere because the engine did no work.
RETRY_STATUSES: Final = frozenset({502, 503})

# The request's affinity key (routing.prefix_key), computed only when a pick has replicas to choose from.
Affinity = Callable[[], str | None]
# What to make of the engine's committed response: relay it (the default) or rewrite it.
Respond = Callable[[Reply, UpstreamResponse, RelayStats], Awaitable[None]]


class Target:
    """Which replicas may take a request: the READY replicas of `model` for which `eligible` holds (all of
    them when it is None). A LoRA adapter's requests go to its base's replicas that have it loaded; a
    follow-up of a stored response goes to the one replica that holds it. `body_for` gives the body each
    tried replica gets (a new response's id names the replica it is made on); `method` is what the request
    is to the engine (a stored response is read with GET)."""

    # A plain class with Final fields rather than a frozen dataclass: made per request on the compiled path
    # (relay.RelayStats says why).
    __slots__ = ("body_for", "eligible", "method", "model")

    def __init__(self, model: str, eligible: Callable[[Replica], bool] | None = None,
                 body_for: Callable[[Replica], bytes] | None = None, method: str = "POST") -> None:
        self.model: Final = model
        self.eligible: Final = eligible
        self.body_for: Final = body_for
        self.method: Final = method


def _excluded(st: GatewayState, target: Target, tried: set[str]) -> set[str]:
    if target.eligible is None:
        return tried
    return tried | {r.endpoint for r in st.table.ready().get(target.model, ()) if not target.eligible(r)}


async def _pick(st: GatewayState, target: Target, tried: set[str], prefix: Affinity | None, first: bool
                ) -> Replica | None:
    replica = st.table.pick(target.model, _excluded(st, target, tried), prefix)
    # Only the first attempt waits: a model that is loading gets its first replica, a retry does not
    # wait for replicas that were already all tried.
    if (replica is None and first and st.cfg.no_replica_wait_s > 0
            and await st.table.wait_for_replica(target.model, st.cfg.no_replica_wait_s)):
        replica = st.table.pick(target.model, _excluded(st, target, tried), prefix)
    return replica


class _Retry(NamedTuple):
    """An attempt to be made again on another replica: why (the retries metric's reason), and whether the
    replica failed after the request reached it."""

    reason: str
    midway: bool = False


async def forward(reply: Reply, path_qs: str, st: GatewayState, ex: Exchange, body: bytes,
                  headers: dict[str, str], prefix: Affinity | None, respond: Respond = relay,
                  target: Target | None = None) -> None:
    """Send `body` (POST unless `target` says otherwise) with `headers` to `path_qs` on a replica of `target`
    (default: any replica of `ex.model`) and answer with `respond`.

    `prefix` gives the request's affinity key (routing.prefix_key) when a pick weighs several replicas, None
    for none; `ex` records the replica
    that answered, the attempts and (through the relay) the body's timing. A replica that refuses the
    connection, or dies before its response starts, is replaced by another: nothing reached the client yet, and
    an inference request has no effect beyond its answer, so replaying it is safe. Raises ApiError 503 (with
    Retry-After) when no replica could take it, 504 on upstream_timeout_s, 502 when every try failed so.
    """
    target = target or Target(ex.model)
    model = target.model
    tried: set[str] = set()
    failed_midway = ""
    for attempt in range(st.cfg.max_attempts):
        replica = await _pick(st, target, tried, prefix, attempt == 0)
        if replica is None:
            break
        ex.replica, ex.attempts = replica.instance, attempt + 1
        st.routing.picks(model, replica.instance).inc()
        with st.table.track(replica):
            retry = await _attempt(reply, path_qs, st, ex, body, headers, respond, target, replica,
                                   attempt + 1 < st.cfg.max_attempts, tried)
        if retry is None:
            return
        st.routing.retries(model, retry.reason).inc()
        tried.add(replica.endpoint)
        if retry.midway:
            failed_midway = replica.instance
    st.routing.no_replica(model).inc()
    if failed_midway:
        raise ApiError(502, f"replica {failed_midway} failed before answering and no other could take the request",
                       code="upstream_error")
    if tried:
        raise unavailable(f"no replica of model '{model}' could be reached (tried {len(tried)})")
    raise unavailable(f"model '{model}' has no ready replica yet", code="model_not_ready")


async def _attempt(reply: Reply, path_qs: str, st: GatewayState, ex: Exchange, body: bytes,
                   headers: dict[str, str], respond: Respond, target: Target, replica: Replica, more: bool,
                   tried: set[str]) -> _Retry | None:
    """One try of the request on `replica`: None once it answered the client, else why another replica is to
    be tried. `more`: whether attempts are left, without which a 502/503 is the client's answer. (A function
    of its own, not the loop's body: compiled code (scripts/compile_data_path.py) has no `continue` out of a
    `with`.)"""
    try:
        data = body if target.body_for is None else target.body_for(replica)
        upstream = await st.upstream.post(replica.endpoint, path_qs, headers, data, st.cfg.upstream_timeout_s,
                                          method=target.method)
    except UpstreamUnreachable as unreachable:
        log.info("replica %s (%s) unreachable, trying another: %r", replica.instance, replica.endpoint,
                 unreachable, extra=ex.log_fields())
        return _Retry("connect")
    except TimeoutError:
        raise ApiError(504, "the model did not answer in time", code="timeout") from None
    except UpstreamDisconnected as disconnected:
        log.warning("replica %s failed before answering, trying another: %r", replica.instance, disconnected,
                    extra=ex.log_fields())
        return _Retry("disconnect", midway=True)
    async with upstream:
        if (upstream.status in RETRY_STATUSES and more
                and st.table.has_candidate(target.model, _excluded(st, target, tried | {replica.endpoint}))):
            log.info("replica %s answered %d, trying another", replica.instance, upstream.status,
                     extra=ex.log_fields())
            return _Retry(str(upstream.status))
        try:
            await respond(reply, upstream, ex.stats)
        except UpstreamBroke as broke:
            # Its body broke off before anything went to the client: as good as no answer.
            log.warning("replica %s broke off its answer, trying another: %s", replica.instance, broke,
                        extra=ex.log_fields())
            return _Retry("broken", midway=True)
        return None
