"""Prometheus service discovery, pure: where each service's /metrics answers, and the `http_sd_configs`
document listing every Nebula service and every serving engine.

Services register a `ServiceRecord` under `/nebula/services/<service>/<node>/<address>` (own lease);
engines need no registration: their instance records already carry the endpoint.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nebula.core.model import InstanceStatus, Phase, expect_field
from nebula.errors import ValidationError

METRICS_PATH = "/metrics"
# An engine serves /metrics from when it answers /health until its unit is down; before that (loading
# weights) a scrape could only fail, and "down while starting" would be noise.
SCRAPED_PHASES = frozenset({Phase.READY, Phase.DRAINING})
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


class ServiceKind(enum.StrEnum):
    """A Nebula service with a /metrics of its own; `nebula-<kind>` is its unit and its Prometheus job."""

    GATEWAY = "gateway"
    SCHEDULER = "scheduler"
    NODE = "node"


@dataclass(frozen=True)
class ServiceRecord:
    service: ServiceKind
    node: str
    address: str  # host:port, as Prometheus should reach it
    scheme: str = "http"

    @staticmethod
    def from_dict(obj: object) -> ServiceRecord:
        if not isinstance(obj, dict):
            raise ValidationError("", "service record must be a JSON object")
        try:
            service = ServiceKind(expect_field(obj, "service", str))
        except ValueError:
            raise ValidationError("service", f"must be one of {', '.join(k.value for k in ServiceKind)}") from None
        scheme = expect_field(obj, "scheme", str, "http")
        if scheme not in ("http", "https"):
            raise ValidationError("scheme", "must be 'http' or 'https'")
        address = expect_field(obj, "address", str)
        if not address or "/" in address:
            raise ValidationError("address", "must be host:port")
        return ServiceRecord(service=service, node=expect_field(obj, "node", str), address=address, scheme=scheme)

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service.value, "node": self.node, "address": self.address, "scheme": self.scheme}


def advertised_address(bind_host: str, port: int, node_address: str) -> str:
    """host:port at which others reach a service bound to `bind_host`: a wildcard bind is reached at the
    node's address, a specific one at itself."""
    host = node_address if bind_host in _WILDCARDS else bind_host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    return f"{host}:{port}"


def _group(target: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"targets": [target], "labels": labels}


def sd_targets(services: Iterable[ServiceRecord], instances: Iterable[InstanceStatus]) -> list[dict[str, Any]]:
    """The `http_sd_configs` answer: one target group per service and per engine serving /metrics.

    Labels: job (`nebula-<service>`, `nebula-engine`), service, node; engines also model and instance
    (the Nebula instance, which names the engine better than its host:port). Sorted, so that the same
    cluster always gives the same document.
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for s in services:
        groups[(f"nebula-{s.service.value}", s.address)] = _group(s.address, {
            "job": f"nebula-{s.service.value}", "service": s.service.value, "node": s.node,
            "__scheme__": s.scheme, "__metrics_path__": METRICS_PATH})
    for inst in instances:
        if inst.phase not in SCRAPED_PHASES or not inst.endpoint:
            continue
        url = urlsplit(inst.endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            continue
        # Two records for one endpoint (a stale one beside its successor): the first by name wins, as routing does.
        key = ("nebula-engine", url.netloc)
        if key in groups and groups[key]["labels"]["instance"] < inst.instance:
            continue
        groups[key] = _group(url.netloc, {
            "job": "nebula-engine", "service": "engine", "node": inst.node, "model": inst.model,
            "instance": inst.instance, "__scheme__": url.scheme,
            "__metrics_path__": url.path.rstrip("/") + METRICS_PATH})
    return [groups[k] for k in sorted(groups)]
