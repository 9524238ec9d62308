"""The rules a parsed configuration must keep beyond its types (ports, ranges, choices, safe defaults).

Apart from core/config.py so that each stays readable in one sitting; config.py calls `validate` on every
parse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nebula.core.engine_args import flag_name, never_allowed
from nebula.core.model import RUNTIME_RE
from nebula.errors import ValidationError

if TYPE_CHECKING:
    from nebula.core.config import NebulaConfig


def validate(cfg: NebulaConfig) -> None:
    """ValidationError naming the first key whose value cannot work, with what is wrong."""
    for section, name in (("gateway", "port"), ("scheduler", "port"), ("node", "port")):
        port = getattr(getattr(cfg, section), name)
        if not 1 <= port <= 65535:
            raise ValidationError(f"{section}.{name}", f"must be a TCP port (1-65535), got {port}")
    if not (1024 <= cfg.node.port_min <= cfg.node.port_max <= 65535):
        raise ValidationError("node.port_min", "node.port_min..node.port_max must be a range within 1024-65535")
    if cfg.node.unit_backend not in ("auto", "systemd", "process"):
        raise ValidationError("node.unit_backend", "must be 'auto', 'systemd' or 'process'")
    if cfg.engine.vllm_device not in ("auto", "cpu", "gpu"):
        raise ValidationError("engine.vllm_device", "must be 'auto', 'cpu' or 'gpu'")
    if not RUNTIME_RE.fullmatch(cfg.engine.default_runtime):
        raise ValidationError("engine.default_runtime", "must be a runtime name such as vllm or vllm-0.32-cu13")
    if cfg.scheduler.idle_action not in ("stop", "sleep"):
        raise ValidationError("scheduler.idle_action", "must be 'stop' or 'sleep'")
    for name in ("target_inflight", "scale_up_window_s", "scale_down_window_s", "scale_cooldown_s",
                 "load_report_stale_s", "scaling_pass_s", "evict_quiet_s"):
        if getattr(cfg.scheduler, name) <= 0:
            raise ValidationError(f"scheduler.{name}", "must be more than 0")
    if not 0 < cfg.scheduler.scale_low_ratio < 1:
        raise ValidationError("scheduler.scale_low_ratio", "must be between 0 and 1 (exclusive)")
    if cfg.log.level not in ("debug", "info", "warning", "error"):
        raise ValidationError("log.level", "must be one of debug, info, warning, error")
    for i, label in enumerate(cfg.node.labels):
        key, sep, _ = label.partition("=")
        if not sep or not key.strip():
            raise ValidationError(f"node.labels[{i}]", f"must look like key=value, got {label!r}")
    if not cfg.cluster.etcd_endpoints:
        raise ValidationError("cluster.etcd_endpoints", "must list at least one etcd URL")
    for i, ep in enumerate(cfg.cluster.etcd_endpoints):
        if not ep.startswith(("http://", "https://")) or ":" not in ep.split("//", 1)[1]:
            raise ValidationError(f"cluster.etcd_endpoints[{i}]", f"must look like http://HOST:PORT, got {ep!r}")
    for key in cfg.gateway.admin_key_hashes + cfg.gateway.api_key_hashes:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValidationError("gateway.admin_key_hashes", "entries must be lowercase SHA-256 hex digests")
    _validate_security(cfg)
    for i, arg in enumerate(cfg.engine.allowed_engine_args):
        if (flag := flag_name(arg)) is None or flag != arg or never_allowed(flag):
            raise ValidationError(f"engine.allowed_engine_args[{i}]", f"{arg!r}: list flags as vLLM spells them "
                                  "(--max-num-seqs); --host, --port and the like can never be allowed")
    if cfg.cluster.lease_ttl_s < 2:
        raise ValidationError("cluster.lease_ttl_s", "must be at least 2 seconds")
    if cfg.gateway.max_attempts < 1:
        raise ValidationError("gateway.max_attempts", "must be at least 1")
    for name in ("max_connections", "max_connections_per_ip", "request_timeout_s"):
        if getattr(cfg.gateway, name) < 0:
            raise ValidationError(f"gateway.{name}", "must be 0 or more (0: see its doc)")
    for name in ("header_timeout_s", "body_timeout_s", "write_timeout_s"):
        if getattr(cfg.gateway, name) <= 0:
            raise ValidationError(f"gateway.{name}", "must be more than 0 seconds")
    if cfg.engine.watchdog_s <= 0:
        raise ValidationError("engine.watchdog_s", "must be more than 0 seconds")
    for name in ("hf_endpoint", "modelscope_endpoint"):
        url = getattr(cfg.node, name)
        if url and not url.startswith(("http://", "https://")):
            raise ValidationError(f"node.{name}", f"must be an http(s):// URL, got {url!r}")
    for section, name in (("scheduler", "gpu_headroom_mib"), ("node", "gpu_outside_step_mib"),
                          ("node", "gpu_release_slack_mib"), ("node", "gpu_release_timeout_s")):
        if getattr(getattr(cfg, section), name) < 0:
            raise ValidationError(f"{section}.{name}", "must be 0 or more")
    if cfg.node.download_workers < 1:
        raise ValidationError("node.download_workers", "must be at least 1")
    for name in ("load_report_s", "wake_keepalive_s"):
        if getattr(cfg.gateway, name) < 0:
            raise ValidationError(f"gateway.{name}", "must be 0 or more (0: see its doc)")
    if cfg.gateway.wake_wait_s <= 0:
        raise ValidationError("gateway.wake_wait_s", "must be more than 0 seconds")
    if cfg.gateway.max_held_requests < 0:
        raise ValidationError("gateway.max_held_requests", "must be 0 or more (0: never hold a request)")
    if cfg.gateway.access_log not in ("all", "errors", "off"):
        raise ValidationError("gateway.access_log", "must be 'all', 'errors' or 'off'")
    if cfg.gateway.event_loop not in ("uvloop", "asyncio"):
        raise ValidationError("gateway.event_loop", "must be 'uvloop' or 'asyncio'")
    if not 1 <= cfg.gateway.workers <= 256:
        raise ValidationError("gateway.workers", "must be between 1 and 256")
    if cfg.gateway.worker_metrics_port and not 1 <= cfg.gateway.worker_metrics_port <= 65535 - cfg.gateway.workers:
        raise ValidationError("gateway.worker_metrics_port", "must leave room for one port per worker below 65536")
    ep = cfg.tracing.otlp_endpoint
    if ep and not ep.startswith(("http://", "https://")):
        raise ValidationError("tracing.otlp_endpoint", f"must be an http(s):// URL, got {ep!r}")
    if not 0.0 <= cfg.tracing.sample_ratio <= 1.0:
        raise ValidationError("tracing.sample_ratio", "must be between 0 and 1")
    for name in ("kv_concurrency", "read_max_bytes"):
        if getattr(cfg.models, name) < 1:
            raise ValidationError(f"models.{name}", "must be at least 1")
    if cfg.models.activation_overhead_mib < 0:
        raise ValidationError("models.activation_overhead_mib", "must be 0 or more MiB")
    if cfg.models.read_timeout_s <= 0:
        raise ValidationError("models.read_timeout_s", "must be more than 0 seconds")


def _validate_security(cfg: NebulaConfig) -> None:
    gw, cl = cfg.gateway, cfg.cluster
    if bool(gw.tls_cert_file) != bool(gw.tls_key_file):
        raise ValidationError("gateway.tls_cert_file", "set both tls_cert_file and tls_key_file, or neither")
    if bool(cl.etcd_cert_file) != bool(cl.etcd_key_file):
        raise ValidationError("cluster.etcd_cert_file", "set both etcd_cert_file and etcd_key_file, or neither")
    if bool(cl.etcd_user) != bool(cl.etcd_password):
        raise ValidationError("cluster.etcd_user", "set both etcd_user and etcd_password, or neither")
    schemes = {ep.split("://", 1)[0] for ep in cl.etcd_endpoints}
    if len(schemes) > 1:
        raise ValidationError("cluster.etcd_endpoints", "use https:// for every endpoint or for none")
    if (cl.etcd_ca_file or cl.etcd_cert_file) and schemes != {"https"}:
        raise ValidationError("cluster.etcd_ca_file", "etcd TLS files need https:// etcd_endpoints")
