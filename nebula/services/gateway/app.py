"""The gateway app: the public edge (OpenAI API, admin API, keys, validation, /metrics) and the data
plane's only hop: it picks a READY replica itself and forwards to its engine (forward.py)."""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula.adapters.agent_logs import agent_tail
from nebula.adapters.engine_metrics import fetch_metrics_text
from nebula.adapters.model_files import read_families
from nebula.adapters.sdnotify import Notifier
from nebula.adapters.shared_limits import worker_limiter
from nebula.adapters.upstream_http import UpstreamPool
from nebula.core import records
from nebula.core.catalog import Catalog
from nebula.core.config import EngineConfig, GatewayConfig, ModelsConfig, NebulaConfig, NodeConfig, TracingConfig
from nebula.core.elastic import LoadReport
from nebula.core.families import Families
from nebula.core.limits import KeyLimiter
from nebula.core.routing import LoadPolicy
from nebula.core.store import Store
from nebula.errors import ConfigError
from nebula.services.catalog_files import load_catalog
from nebula.services.cluster.mirror import Mirror, MirrorMetrics, MirrorSet
from nebula.services.cluster.writes import ClusterWrites
from nebula.services.gateway import (
    admin_api,
    audio_api,
    catalog_api,
    console,
    discovery,
    gpu_live,
    keys_api,
    openai_api,
    responses_api,
    status_api,
)
from nebula.services.gateway.auth import Authenticator, read_digest_file
from nebula.services.gateway.console_logs import CONSOLE_LOGS, ConsoleLogs
from nebula.services.gateway.console_session import console_secret
from nebula.services.gateway.dataplane import RESERVE_PATHS, admit_by_key, connection_limits, dataplane_router
from nebula.services.gateway.exchange import add_request_id_header
from nebula.services.gateway.gpu_live import GpuLive
from nebula.services.gateway.load import Clock, LoadBook, poll_loads
from nebula.services.gateway.load_report import model_loads, publish_loads, reporter_name
from nebula.services.gateway.metrics import GatewayMetrics
from nebula.services.gateway.model_metrics import ModelCollector
from nebula.services.gateway.openapi import openapi_route
from nebula.services.gateway.pipeline import PIPELINE, RequestPipeline, pipeline_middleware
from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.routing_metrics import RoutingMetrics
from nebula.services.gateway.state import GATEWAY, GatewayState
from nebula.services.gateway.tls import server_ssl_context
from nebula.services.gateway.tracing import RequestTracer
from nebula.services.gateway.unknown_paths import unknown_path_middleware
from nebula.services.gateway.view import ClusterView
from nebula.services.gateway.wake import WakeMetrics, Waker
from nebula.services.http.admission import open_file_limit, raise_open_file_limit
from nebula.services.http.errors import error_middleware
from nebula.services.http.site import FastSite
from nebula.services.runtime import background, metrics_route, node_name, serve_until_cancelled

log = logging.getLogger(__name__)

FIRST_LISTING_WAIT_S = 10.0
"""How long a starting gateway waits for its first view of keys, models and replicas before it opens its port.
Opened earlier, a restart answers 503 "not loaded yet" to everything in flight for those milliseconds, where
a client that finds the port closed reconnects and retries; later, with the store away, it serves anyway and
says which view is missing (503 models_not_loaded), rather than keep systemd waiting for READY=1."""


async def _healthz(request: web.Request) -> web.Response:
    """200 while the gateway's view of the cluster can be trusted; 503 naming the mirrors that cannot (a
    revoked key or a deleted replica might still be honoured from a view that stopped following etcd)."""
    st = request.app[GATEWAY]
    stale = st.mirrors.not_live()
    return web.json_response({"status": "unhealthy" if stale else "ok", "models_synced": st.view.models_synced,
                              "models": len(st.view.models), "replicas_synced": st.table.synced,
                              "ready_replicas": sum(len(r) for r in st.table.ready().values()),
                              "mirrors_not_live": stale}, status=503 if stale else 200)


def load_policy(cfg: GatewayConfig) -> LoadPolicy:
    return LoadPolicy(waiting_weight=cfg.load_waiting_weight, kv_cache_threshold=cfg.kv_cache_threshold,
                      kv_cache_penalty=cfg.kv_cache_penalty, affinity_slack=cfg.affinity_slack)


def build_gateway_app(cfg: GatewayConfig, store: Store, registry: CollectorRegistry,
                      http_session: aiohttp.ClientSession | None = None,
                      clock: Clock = time.monotonic, tracing: TracingConfig | None = None,
                      engine: EngineConfig | None = None, catalog: Catalog | None = None,
                      node: NodeConfig | None = None, models: ModelsConfig | None = None,
                      families: Families | None = None, gpu_headroom_mib: int = 1024, reporter: str = "",
                      lease_ttl_s: int = 10, console_secret: bytes | None = None,
                      limiter: KeyLimiter | None = None) -> web.Application:
    """The gateway app. Its mirrors of models and instances, the engine load poll, its HTTP session (for
    the load poll), its engine connections and its span exporter live in cleanup_ctx; an injected
    `http_session` is used as is and left open. `reporter`: this process's name in /nebula/load/ (its load
    report, under a lease of `lease_ttl_s`; empty: no report) and in the wake requests it makes. `limiter`: the
    per-key limits shared with the gateway's other workers (None: this process counts alone)."""
    view = ClusterView()
    # A sample outlives a few failed polls (see load.py), not more: past that it describes another moment.
    loads = LoadBook(max_age_s=3 * cfg.load_poll_s)
    table = ReplicaTable(load_policy(cfg), loads)
    auth = Authenticator(cfg.admin_key_hashes, cfg.api_key_hashes, clock, limiter)
    mirror_metrics = MirrorMetrics(registry)
    # The console's log tails: each agent's address and log token (console_logs.py).
    logs = ConsoleLogs(lambda access, model, backlog: agent_tail(state.http(), access, model, backlog))
    mirrors = MirrorSet([Mirror(store, records.MODELS, mirror_metrics, on_change=view.update_models),
                         Mirror(store, records.INSTANCES, mirror_metrics, on_change=table.update),
                         Mirror(store, records.APIKEYS, mirror_metrics, on_change=auth.update_keys),
                         Mirror(store, records.ADAPTERS, mirror_metrics, on_change=view.update_adapters),
                         Mirror(store, records.WAKE, mirror_metrics, on_change=view.update_wakes),
                         Mirror(store, records.SCALE, mirror_metrics, on_change=view.update_scale),
                         Mirror(store, records.LOG_ACCESS, mirror_metrics, on_change=logs.update)])
    state = GatewayState(cfg=cfg, store=store, view=view, metrics=GatewayMetrics(registry), auth=auth,
                         table=table, routing=RoutingMetrics(registry, table, clock), clock=clock,
                         upstream=UpstreamPool(cfg.connect_timeout_s), mirrors=mirrors, writes=ClusterWrites(store),
                         session=http_session, engine=engine or EngineConfig(), node=node or NodeConfig(),
                         models=models or ModelsConfig(), families=families, gpu_headroom_mib=gpu_headroom_mib)
    pipeline = RequestPipeline(auth)  # both servers' (pipeline.py): here on aiohttp, in gateway_site on the other
    # error_middleware is outermost so that auth failures and oversized bodies get the OpenAI shape too.
    app = web.Application(middlewares=[error_middleware, unknown_path_middleware(),
                                       pipeline_middleware(pipeline, console.session_auth())],
                          client_max_size=cfg.max_body_bytes)
    app[GATEWAY] = state
    app[PIPELINE] = pipeline
    # The web console (/ui/): its sessions are signed with a secret the gateway's workers share.
    app[console.CONSOLE] = console.ConsoleState(secret=console_secret or os.urandom(32), registry=registry,
                                                secure=bool(cfg.tls_cert_file), files=console.read_static(),
                                                gpus=GpuLive(lambda url: fetch_metrics_text(
                                                    state.http(), url, gpu_live.TIMEOUT_S), time.monotonic))
    app[CONSOLE_LOGS] = logs
    app.on_response_prepare.append(console.add_security_headers)
    app[catalog_api.CATALOG] = catalog if catalog is not None else Catalog()
    registry.register(ModelCollector(view, table))
    state.waker = Waker(cfg, table, state.load, state.writes.request_wake, WakeMetrics(registry), reporter)
    view.holding = state.waker.waking
    app.on_response_prepare.append(add_request_id_header)

    async def tracer_ctx(_: web.Application) -> AsyncIterator[None]:
        state.tracer = RequestTracer.create(tracing, "nebula-gateway") if tracing is not None else None
        yield
        if state.tracer is not None:
            await state.tracer.shutdown()

    app.cleanup_ctx.append(tracer_ctx)
    async def session_ctx(_: web.Application) -> AsyncIterator[None]:
        try:
            if http_session is not None:
                yield
                return
            state.session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
            yield
            await state.session.close()
        finally:
            state.upstream.close()

    app.cleanup_ctx.append(session_ctx)
    for mirror in mirrors.mirrors:
        app.cleanup_ctx.append(background(mirror.run, f"gateway-mirror {mirror.prefix}"))
    if cfg.load_poll_s > 0:
        # After session_ctx: the poll uses the session, and cleanup stops the poll before closing it.
        app.cleanup_ctx.append(background(
            lambda: poll_loads(table.ready_endpoints, loads, state.fetch_load, cfg.load_poll_s, clock),
            "gateway-load-poll"))
    if reporter and cfg.load_report_s > 0:
        app.cleanup_ctx.append(background(lambda: publish_loads(
            store, state.writes, lambda: LoadReport(reporter, time.time(), model_loads(
                state.load, table.ready(), loads, view.models)), cfg.load_report_s, lease_ttl_s),
            "gateway-load-report"))
    app.add_routes(openai_api.routes() + audio_api.routes() + responses_api.routes() + admin_api.routes()
                   + status_api.routes()
                   + keys_api.routes() + catalog_api.routes() + discovery.routes() + [openapi_route()]
                   + console.routes())
    app.add_routes([web.get("/healthz", _healthz), metrics_route(registry)])
    return app


def gateway_site(runner: web.AppRunner, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                 reuse_port: bool = False, shutdown_timeout_s: float = 60.0) -> FastSite:
    """The gateway app's listening site on host:port: connections start on its data-plane server (the
    OpenAI paths), which hands any other request to aiohttp with its connection."""
    state = runner.app[GATEWAY]
    events = state.metrics.connections
    site = FastSite(runner, dataplane_router(state), host, port, max_body=state.cfg.max_body_bytes,
                    ssl_context=ssl_context, reuse_port=reuse_port, shutdown_timeout_s=shutdown_timeout_s,
                    admit=admit_by_key(runner.app[PIPELINE]), limits=connection_limits(state.cfg, open_file_limit()),
                    events=events, reserve_paths=RESERVE_PATHS, body_limits=audio_api.upload_limits(state.cfg))
    events.open.set_function(lambda: site.server.open)
    return site


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or '' (every interface): it may resolve to anything


def with_bootstrap_key(cfg: GatewayConfig) -> GatewayConfig:
    """`cfg` with the bootstrap admin key's digest (read from admin_key_digest_file) among its admin keys.

    Raises ConfigError (one line naming the fix) for a gateway that would be open beyond loopback: with no
    admin key in the config or the digest file it answers anyone until a key is stored in etcd, and again
    whenever none is. Stored keys do not count: the gateway knows them only after its first listing, and
    revoking the last would reopen it; the package always has the digest file, and `nebula up` makes it.
    """
    gw = replace(cfg, admin_key_hashes=cfg.admin_key_hashes + read_digest_file(cfg.admin_key_digest_file))
    if not gw.admin_key_hashes and not _is_loopback(gw.host):
        where = gw.admin_key_digest_file or "gateway.admin_key_digest_file"
        raise ConfigError("gateway.host", f"gateway.host is {gw.host!r} (beyond loopback) but no admin key is "
                          f"configured: create the bootstrap admin key (`nebula up` makes it; digest in {where}) "
                          "or set gateway.admin_key_hashes, or bind gateway.host to 127.0.0.1")
    return gw


async def serve_gateway(cfg: NebulaConfig, store: Store, registry: CollectorRegistry,
                        notifier: Notifier, worker: int | None = None,
                        listening_hook: Callable[[], None] = lambda: None) -> None:
    """Serve the gateway on cfg.gateway.host:port until cancelled (READY=1 once listening); `worker`: its index
    among several (SO_REUSEPORT; per-key limits counted with the others through the supervisor's table);
    `listening_hook`: run once it listens (the gateway's own process: runtime.settle_heap)."""
    # The bootstrap admin key: the gateway reads its digest; the key itself stays root's (docs/security.md).
    gw = with_bootstrap_key(cfg.gateway)
    app = build_gateway_app(gw, store, registry, tracing=cfg.tracing, engine=cfg.engine,
                            catalog=load_catalog(cfg.catalog), node=cfg.node, models=cfg.models,
                            families=read_families(cfg.models.profiles_files),
                            gpu_headroom_mib=cfg.scheduler.gpu_headroom_mib,
                            reporter=reporter_name(node_name(cfg), os.getpid()), lease_ttl_s=cfg.cluster.lease_ttl_s,
                            console_secret=console_secret(os.environ),
                            limiter=worker_limiter(os.environ, worker, time.monotonic))
    tls = server_ssl_context(gw)
    raise_open_file_limit()  # before the site derives its connection cap from it
    await serve_until_cancelled(app, gw.host, gw.port, notifier, "gateway",
                                site=lambda runner: gateway_site(runner, gw.host, gw.port, tls, worker is not None),
                                healthy=app[GATEWAY].mirrors.live, listening_hook=listening_hook,
                                before_listening=lambda: wait_for_first_listing(app[GATEWAY].mirrors))


async def wait_for_first_listing(mirrors: MirrorSet, timeout_s: float = FIRST_LISTING_WAIT_S) -> list[str]:
    """Hold the port closed until the gateway knows its keys, models and replicas (FIRST_LISTING_WAIT_S);
    the prefixes it opens without."""
    missing = await mirrors.wait_listed(timeout_s)
    if missing:
        log.warning("no first listing of %s after %.1f s (is etcd reachable?); serving anyway: requests get "
                    "503 until it comes", ", ".join(missing), timeout_s)
    return missing
