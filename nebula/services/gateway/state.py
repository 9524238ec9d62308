"""The gateway's typed app state, shared by its OpenAI, forwarding and admin handlers."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from nebula.adapters.engine_metrics import fetch_engine_load
from nebula.adapters.upstream_http import UpstreamPool
from nebula.core.config import EngineConfig, GatewayConfig, ModelsConfig, NodeConfig
from nebula.core.engine_load import EngineLoad
from nebula.core.families import Families
from nebula.core.store import Store
from nebula.services.cluster.mirror import MirrorSet
from nebula.services.cluster.writes import ClusterWrites
from nebula.services.gateway.auth import Authenticator
from nebula.services.gateway.load import Clock
from nebula.services.gateway.load_report import LoadAccounting
from nebula.services.gateway.metrics import GatewayMetrics
from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.routing_metrics import RoutingMetrics
from nebula.services.gateway.tracing import RequestTracer
from nebula.services.gateway.view import ClusterView
from nebula.services.gateway.wake import Waker


@dataclass
class GatewayState:
    cfg: GatewayConfig
    store: Store
    view: ClusterView
    metrics: GatewayMetrics
    auth: Authenticator
    table: ReplicaTable
    routing: RoutingMetrics
    clock: Clock
    # The engine hop (forwarded requests): its own lean client, see upstream_http.
    upstream: UpstreamPool
    # The gateway's typed mirrors of models, instances and API keys (run in the app's cleanup_ctx).
    mirrors: MirrorSet
    # Every write the admin API makes to the cluster.
    writes: ClusterWrites
    # For the load poll of engines' /metrics. Opened in the app's cleanup_ctx (a session belongs to a
    # running loop), or injected by the caller.
    session: aiohttp.ClientSession | None = field(default=None)
    # None unless [tracing] otlp_endpoint is set.
    tracer: RequestTracer | None = field(default=None)
    # What a model spec may ask of the engines ([engine] allowed_engine_args, allow_trust_remote_code).
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Where a load reads a model's files from (the hub endpoint and token of [node]) and how it sizes it.
    node: NodeConfig = field(default_factory=NodeConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    # Model families (parsers per family), read once at start so a bad profiles file stops the start; None:
    # read at each load (tests).
    families: Families | None = None
    # [scheduler] gpu_headroom_mib: the per-GPU reserve a load's sizing keeps, as placement does.
    gpu_headroom_mib: int = 1024
    # This process's load per model (load_report.py), counted on the request path; published to /nebula/load/.
    load: LoadAccounting = field(default_factory=LoadAccounting)
    # Holds requests for elastic models with no ready replica while they wake (wake.py); set by the app.
    waker: Waker | None = None

    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("gateway HTTP session used outside the app's lifetime")
        return self.session

    async def fetch_load(self, endpoint: str) -> EngineLoad:
        return await fetch_engine_load(self.http(), endpoint, self.cfg.load_timeout_s)


GATEWAY = web.AppKey("gateway", GatewayState)
