"""The gateway app: the public edge (OpenAI API, admin API, keys, validation, /metrics) and the data
plane's only hop: it picks a READY replica itself and forwards to its engine (forward.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula.adapters.sdnotify import Notifier
from nebula.adapters.store import Store
from nebula.adapters.watching import mirror_prefix
from nebula.core import keys
from nebula.core.config import GatewayConfig, NebulaConfig
from nebula.core.routing import LoadPolicy
from nebula.services.gateway import admin_api, openai_api
from nebula.services.gateway.auth import Authenticator, auth_middleware
from nebula.services.gateway.load import Clock, LoadBook, poll_loads
from nebula.services.gateway.metrics import GatewayMetrics
from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.routing_metrics import RoutingMetrics
from nebula.services.gateway.state import GATEWAY, GatewayState, engine_timeout
from nebula.services.gateway.view import ClusterView
from nebula.services.http.errors import error_middleware
from nebula.services.http.relay import new_session
from nebula.services.runtime import background, metrics_route, serve_until_cancelled


async def _healthz(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    return web.json_response({"status": "ok", "models_synced": st.view.models_synced,
                              "models": len(st.view.models), "replicas_synced": st.table.synced,
                              "ready_replicas": sum(len(r) for r in st.table.ready().values())})


def load_policy(cfg: GatewayConfig) -> LoadPolicy:
    return LoadPolicy(waiting_weight=cfg.load_waiting_weight, kv_cache_threshold=cfg.kv_cache_threshold,
                      kv_cache_penalty=cfg.kv_cache_penalty, affinity_slack=cfg.affinity_slack)


def build_gateway_app(cfg: GatewayConfig, store: Store, registry: CollectorRegistry,
                      http_session: aiohttp.ClientSession | None = None,
                      clock: Clock = time.monotonic) -> web.Application:
    """The gateway app. Its mirrors of models and instances, the engine load poll and its HTTP session
    live in cleanup_ctx; an injected `http_session` is used as is and left open."""
    view = ClusterView()
    # A sample outlives a few failed polls (see load.py), not more: past that it describes another moment.
    loads = LoadBook(max_age_s=3 * cfg.load_poll_s)
    table = ReplicaTable(load_policy(cfg), loads)
    auth = Authenticator(cfg.admin_key_hashes, cfg.api_key_hashes)
    state = GatewayState(cfg=cfg, store=store, view=view, metrics=GatewayMetrics(registry), auth=auth,
                         table=table, routing=RoutingMetrics(registry, table, clock), clock=clock,
                         timeout=engine_timeout(cfg), session=http_session)
    # error_middleware is outermost so that auth failures and oversized bodies get the OpenAI shape too.
    app = web.Application(middlewares=[error_middleware, auth_middleware(auth)],
                          client_max_size=cfg.max_body_bytes)
    app[GATEWAY] = state

    async def session_ctx(_: web.Application) -> AsyncIterator[None]:
        if http_session is not None:
            yield
            return
        state.session = new_session()
        yield
        await state.session.close()

    app.cleanup_ctx.append(session_ctx)
    app.cleanup_ctx.append(background(lambda: mirror_prefix(store, keys.MODELS, view.update_models),
                                      "gateway-models-watch"))
    app.cleanup_ctx.append(background(lambda: mirror_prefix(store, keys.INSTANCES, table.update),
                                      "gateway-instances-watch"))
    if cfg.load_poll_s > 0:
        # After session_ctx: the poll uses the session, and cleanup stops the poll before closing it.
        app.cleanup_ctx.append(background(
            lambda: poll_loads(table.ready_endpoints, loads, state.fetch_load, cfg.load_poll_s, clock),
            "gateway-load-poll"))
    app.add_routes(openai_api.routes() + admin_api.routes())
    app.add_routes([web.get("/healthz", _healthz), metrics_route(registry)])
    return app


async def serve_gateway(cfg: NebulaConfig, store: Store, registry: CollectorRegistry,
                        notifier: Notifier) -> None:
    """Serve the gateway on cfg.gateway.host:port until cancelled (READY=1 once listening)."""
    app = build_gateway_app(cfg.gateway, store, registry)
    await serve_until_cancelled(app, cfg.gateway.host, cfg.gateway.port, notifier, "gateway")
