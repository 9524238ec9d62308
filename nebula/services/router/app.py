"""The router's HTTP app: proxies POST /v1/... to a picked READY replica of the model named by the gateway.

Retries are invisible to the client: a replica that refuses the connection (or answers 502/503 before any
byte went out) is excluded and another is tried, up to RouterConfig.max_attempts. Once the response status
is sent the replica is committed; the body streams through untouched.

The pick is least loaded with prefix affinity (nebula.core.routing): the gateway names the model and the
prefix key in headers, so the router never parses a body. Engine load comes from a background poll of
each READY replica's /metrics every RouterConfig.load_poll_s, never from the request path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from yarl import URL

from nebula.adapters.engine_metrics import EngineLoad, fetch_engine_load
from nebula.adapters.sdnotify import Notifier
from nebula.adapters.store import Store
from nebula.adapters.watching import mirror_prefix
from nebula.core import keys
from nebula.core.config import NebulaConfig, RouterConfig
from nebula.core.routing import MAX_PREFIX_KEY_LEN, PREFIX_HEADER, LoadPolicy
from nebula.services.http.errors import ApiError, error_middleware, unavailable
from nebula.services.http.relay import MODEL_HEADER, forward_headers, new_session, relay
from nebula.services.router.load import Clock, LoadBook, poll_loads
from nebula.services.router.metrics import RouterMetrics
from nebula.services.router.table import ReplicaTable
from nebula.services.runtime import background, metrics_route, serve_until_cancelled

log = logging.getLogger(__name__)

# Statuses an engine gives while it cannot take the request at all (starting, shutting down, overloaded
# proxy in front of it): safe to try elsewhere because the engine did no work.
RETRY_STATUSES = frozenset({502, 503})


@dataclass
class RouterState:
    cfg: RouterConfig
    table: ReplicaTable
    metrics: RouterMetrics
    clock: Clock
    session: aiohttp.ClientSession | None = field(default=None)

    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("router HTTP session used outside the app's lifetime")
        return self.session

    async def fetch_load(self, endpoint: str) -> EngineLoad:
        return await fetch_engine_load(self.http(), endpoint, self.cfg.load_timeout_s)


ROUTER = web.AppKey("router", RouterState)


async def _proxy(request: web.Request) -> web.StreamResponse:
    st = request.app[ROUTER]
    model = request.headers.get(MODEL_HEADER, "")
    if not model:
        raise ApiError(400, f"missing {MODEL_HEADER} header (send requests through the gateway)",
                       param="model")
    body = await request.read()
    label = model if st.table.knows(model) else "unknown"
    prefix = request.headers.get(PREFIX_HEADER)
    if prefix is not None and (not prefix or len(prefix) > MAX_PREFIX_KEY_LEN):
        prefix = None
    headers = forward_headers(request.headers)
    del headers[MODEL_HEADER]
    headers.popall(PREFIX_HEADER, None)  # ours, not the engine's
    timeout = aiohttp.ClientTimeout(total=None, connect=st.cfg.connect_timeout_s,
                                    sock_connect=st.cfg.connect_timeout_s)
    tried: set[str] = set()
    for attempt in range(st.cfg.max_attempts):
        replica = st.table.pick(model, tried, prefix)
        if (replica is None and attempt == 0 and st.cfg.no_replica_wait_s > 0
                and await st.table.wait_for_replica(model, st.cfg.no_replica_wait_s)):
            replica = st.table.pick(model, tried, prefix)
        if replica is None:
            break
        st.metrics.picks.labels(label, replica.instance).inc()
        url = URL(replica.endpoint + request.path_qs, encoded=True)
        with st.table.track(replica):
            try:
                upstream = await st.http().post(url, data=body, headers=headers, timeout=timeout)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                log.info("replica %s (%s) unreachable, trying another: %r",
                         replica.instance, replica.endpoint, e)
                st.metrics.retries.labels(label, "connect").inc()
                tried.add(replica.endpoint)
                continue
            except aiohttp.ClientError as e:
                # The request may have reached the engine: not safe to replay elsewhere.
                log.warning("replica %s failed before answering: %r", replica.instance, e)
                raise ApiError(502, f"replica {replica.instance} failed before answering",
                               code="upstream_error") from None
            async with upstream:
                last = attempt + 1 >= st.cfg.max_attempts
                if (upstream.status in RETRY_STATUSES and not last
                        and st.table.has_candidate(model, tried | {replica.endpoint})):
                    log.info("replica %s answered %d, trying another", replica.instance, upstream.status)
                    st.metrics.retries.labels(label, str(upstream.status)).inc()
                    tried.add(replica.endpoint)
                    continue
                return await relay(request, upstream)
    st.metrics.no_replica.labels(label).inc()
    if tried:
        raise unavailable(f"no replica of model '{model}' could be reached (tried {len(tried)})")
    raise unavailable(f"model '{model}' has no ready replica yet", code="model_not_ready")


async def _replicas(request: web.Request) -> web.Response:
    st = request.app[ROUTER]
    return web.json_response(st.table.to_json(st.clock()))


async def _healthz(request: web.Request) -> web.Response:
    table = request.app[ROUTER].table
    return web.json_response({"status": "ok", "synced": table.synced,
                              "ready_replicas": sum(len(r) for r in table.ready().values())})


def load_policy(cfg: RouterConfig) -> LoadPolicy:
    return LoadPolicy(waiting_weight=cfg.load_waiting_weight, kv_cache_threshold=cfg.kv_cache_threshold,
                      kv_cache_penalty=cfg.kv_cache_penalty, affinity_slack=cfg.affinity_slack)


def build_router_app(cfg: RouterConfig, store: Store, registry: CollectorRegistry,
                     max_body_bytes: int = 64 * 1024 * 1024, clock: Clock = time.monotonic) -> web.Application:
    """The router app; its background tasks (the instance watch, the load poll, the HTTP session) live in
    cleanup_ctx.

    `max_body_bytes` only guards the router itself: the gateway enforces the client-facing limit.
    """
    # A sample outlives a few failed polls (see load.py), not more: past that it describes another moment.
    loads = LoadBook(max_age_s=3 * cfg.load_poll_s)
    table = ReplicaTable(load_policy(cfg), loads)
    state = RouterState(cfg=cfg, table=table, metrics=RouterMetrics(registry, table, clock), clock=clock)
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body_bytes)
    app[ROUTER] = state

    async def session_ctx(_: web.Application) -> AsyncIterator[None]:
        state.session = new_session()
        yield
        await state.session.close()

    app.cleanup_ctx.append(session_ctx)
    app.cleanup_ctx.append(background(lambda: mirror_prefix(store, keys.INSTANCES, table.update),
                                      "router-instances-watch"))
    if cfg.load_poll_s > 0:
        # After session_ctx: the poll uses the session, and cleanup stops the poll before closing it.
        app.cleanup_ctx.append(background(
            lambda: poll_loads(table.ready_endpoints, loads, state.fetch_load, cfg.load_poll_s, clock),
            "router-load-poll"))
    app.add_routes([
        web.post("/v1/{tail:.*}", _proxy),
        web.get("/router/replicas", _replicas),
        web.get("/healthz", _healthz),
        metrics_route(registry),
    ])
    return app


async def serve_router(cfg: NebulaConfig, store: Store, registry: CollectorRegistry,
                       notifier: Notifier) -> None:
    """Serve the router on cfg.router.host:port until cancelled (READY=1 once listening, WATCHDOG=1 after)."""
    app = build_router_app(cfg.router, store, registry, max_body_bytes=max(cfg.gateway.max_body_bytes, 1) * 2)
    await serve_until_cancelled(app, cfg.router.host, cfg.router.port, notifier, "router")
