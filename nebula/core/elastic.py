"""Elastic capacity's value types: a model's scaling policy, and the records that carry load, wake requests
and the scheduler's current replica count through etcd.

Who writes what (core/keys.py names the keys):
- `ScalingPolicy` is part of the model spec (`ModelSpec.scaling`), written by the admin API;
- `LoadReport` (`/nebula/load/<reporter>`): each gateway worker's view of each model's load, under that
  worker's own lease, so it leaves with the process;
- `WakeRequest` (`/nebula/wake/<model>`): created (put if absent) by any gateway worker holding a request
  for a model with no ready replica; deleted by the scheduler leader, fenced, once it has acted on it;
- `ScaleState` (`/nebula/scale/<model>`): how many replicas the scheduler leader wants now, and whether
  they sleep; written only by the leader, fenced. The operator's bounds stay in the spec.

The decisions themselves (when to add, remove, unload, sleep, wake) are pure functions elsewhere in core.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nebula.core.fields import expect_field, expect_int, expect_number, validate_name
from nebula.errors import ValidationError

MAX_REPLICAS = 64
REPORTER_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


class IdleAction(enum.StrEnum):
    """What an idle model's replicas do once `idle_unload_s` has passed without an inference request."""

    STOP = "stop"  # the last replica drains and its unit stops: the GPU is free; a wake is a cold start
    SLEEP = "sleep"  # vLLM's sleep mode (CUDA only): the engine stays, its weights leave the GPU


@dataclass(frozen=True)
class ScalingPolicy:
    """How a model's replica count may change by itself (`ModelSpec.scaling`); absent: a fixed count."""

    min_replicas: int = 1
    """The fewest replicas; 0 lets an idle model unload (needs idle_unload_s)."""
    max_replicas: int = 1
    """The most replicas autoscaling may add."""
    idle_unload_s: float | None = None
    """Seconds without an inference request after which the model goes idle; None: never."""
    idle_action: IdleAction | None = None
    """stop or sleep; None: the fleet default ([scheduler] idle_action)."""
    sleep_level: int = 1
    """vLLM sleep level: 1 keeps the weights in host memory (wakes in seconds), 2 discards them."""
    priority: int = 0
    """When GPUs run out, a model of higher priority may evict an idle one of lower priority (never a busy one)."""
    target_inflight: float | None = None
    """In-flight requests per replica that autoscaling aims at; None: the fleet default."""

    @staticmethod
    def from_dict(obj: object, replicas: int) -> ScalingPolicy:
        """`replicas` is the spec's count, which must lie within the bounds."""
        if not isinstance(obj, dict):
            raise ValidationError("scaling", "must be a JSON object")
        idle = None if obj.get("idle_unload_s") is None else expect_number(obj, "idle_unload_s")
        if idle is not None and not 0 < idle <= 30 * 86400:
            raise ValidationError("scaling.idle_unload_s", "must be more than 0 and at most 30 days (2592000)")
        low = expect_int(obj, "min_replicas", 0, MAX_REPLICAS, 0 if idle is not None else replicas)
        high = expect_int(obj, "max_replicas", 0, MAX_REPLICAS, max(low, replicas))
        if low > high:
            raise ValidationError("scaling.min_replicas", f"({low}) must not be above max_replicas ({high})")
        if high < 1:
            raise ValidationError("scaling.max_replicas", "must be at least 1 (unload the model to remove it)")
        if low == 0 and idle is None:
            raise ValidationError("scaling.idle_unload_s", "is required when min_replicas is 0: how long without "
                                  "requests before the last replica stops")
        if not low <= replicas <= high:
            raise ValidationError("replicas", f"({replicas}) must lie between min_replicas ({low}) and "
                                  f"max_replicas ({high})")
        action_raw = expect_field(obj, "idle_action", str, None)
        try:
            action = None if action_raw is None else IdleAction(action_raw)
        except ValueError:
            raise ValidationError("scaling.idle_action", "must be 'stop' or 'sleep'") from None
        target = None if obj.get("target_inflight") is None else expect_number(obj, "target_inflight")
        if target is not None and not 0 < target <= 100_000:
            raise ValidationError("scaling.target_inflight", "must be more than 0")
        return ScalingPolicy(min_replicas=low, max_replicas=high, idle_unload_s=idle, idle_action=action,
                             sleep_level=expect_int(obj, "sleep_level", 1, 2, 1),
                             priority=expect_int(obj, "priority", -1000, 1000, 0), target_inflight=target)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                             "sleep_level": self.sleep_level, "priority": self.priority}
        if self.idle_unload_s is not None:
            d["idle_unload_s"] = self.idle_unload_s
        if self.idle_action is not None:
            d["idle_action"] = self.idle_action.value
        if self.target_inflight is not None:
            d["target_inflight"] = self.target_inflight
        return d


@dataclass(frozen=True)
class ScaleState:
    """The scheduler leader's current wish for one elastic model (`/nebula/scale/<model>`)."""

    model: str
    replicas: int
    """Replicas wanted now, within the policy's bounds (0: unloaded while idle)."""
    sleep_level: int = 0
    """0: the replicas run; 1 or 2: they are asleep at that vLLM sleep level (GPU nodes only)."""
    reason: str = ""
    """Why the last change was made (for people, and the decision log)."""
    since: float = 0.0
    """Wall-clock time of the last change."""

    @staticmethod
    def from_dict(obj: object) -> ScaleState:
        if not isinstance(obj, dict):
            raise ValidationError("", "scale state must be a JSON object")
        return ScaleState(model=validate_name(expect_field(obj, "model", str), "model"),
                          replicas=expect_int(obj, "replicas", 0, MAX_REPLICAS),
                          sleep_level=expect_int(obj, "sleep_level", 0, 2, 0),
                          reason=expect_field(obj, "reason", str, ""), since=expect_number(obj, "since", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "replicas": self.replicas, "sleep_level": self.sleep_level,
                "reason": self.reason, "since": self.since}


@dataclass(frozen=True)
class ModelLoad:
    """One model's load as one gateway worker sees it."""

    inflight: int = 0
    """Inference requests this worker has in flight to the model's replicas (streams count until they end)."""
    held: int = 0
    """Requests held waiting for the model to wake."""
    waiting: int = 0
    """The engines' own queue (vllm:num_requests_waiting), summed over the model's ready replicas."""
    running: int = 0
    """The engines' running requests (vllm:num_requests_running), summed."""
    kv_cache: float = 0.0
    """The fullest replica's KV-cache use (0-1)."""
    last_request: float = 0.0
    """Wall-clock time of this worker's last inference request for the model (health checks and scrapes do
    not count); 0: none since the worker started. Summed over reports: the latest any worker saw."""

    @property
    def busy(self) -> bool:
        """A request in flight, held, queued or running: the model must stay (a running stream keeps it)."""
        return bool(self.inflight or self.held or self.waiting or self.running)

    @staticmethod
    def from_dict(obj: object) -> ModelLoad:
        if not isinstance(obj, dict):
            raise ValidationError("models", "each model's load must be a JSON object")
        kv = expect_number(obj, "kv_cache", 0.0)
        if not 0.0 <= kv <= 1.0:
            raise ValidationError("kv_cache", "must be between 0 and 1")
        return ModelLoad(inflight=expect_int(obj, "inflight", 0, 1 << 31, 0),
                         held=expect_int(obj, "held", 0, 1 << 31, 0), waiting=expect_int(obj, "waiting", 0, 1 << 31, 0),
                         running=expect_int(obj, "running", 0, 1 << 31, 0), kv_cache=kv,
                         last_request=expect_number(obj, "last_request", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"inflight": self.inflight, "held": self.held, "waiting": self.waiting, "running": self.running,
                "kv_cache": self.kv_cache, "last_request": self.last_request}


@dataclass(frozen=True)
class LoadReport:
    """Every model's load as one gateway worker sees it (`/nebula/load/<reporter>`), refreshed every few seconds."""

    reporter: str
    """The worker's name, unique in the cluster (e.g. <node>.<pid>)."""
    at: float
    """Wall-clock time of the report: a reader ignores one much older than the refresh interval."""
    models: Mapping[str, ModelLoad] = field(default_factory=dict)

    @staticmethod
    def from_dict(obj: object) -> LoadReport:
        if not isinstance(obj, dict):
            raise ValidationError("", "load report must be a JSON object")
        reporter = expect_field(obj, "reporter", str)
        if not REPORTER_RE.fullmatch(reporter):
            raise ValidationError("reporter", "must be lowercase letters, digits, '.', '_' or '-'")
        models = expect_field(obj, "models", dict, {})
        return LoadReport(reporter=reporter, at=expect_number(obj, "at"),
                          models={_model_name(k): ModelLoad.from_dict(v) for k, v in models.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"reporter": self.reporter, "at": self.at,
                "models": {k: v.to_dict() for k, v in sorted(self.models.items())}}


@dataclass(frozen=True)
class WakeRequest:
    """A gateway holds requests for a model with no ready replica (`/nebula/wake/<model>`)."""

    model: str
    at: float
    """Wall-clock time the first held request arrived."""
    by: str = ""
    """The reporter name of the gateway worker that asked."""

    @staticmethod
    def from_dict(obj: object) -> WakeRequest:
        if not isinstance(obj, dict):
            raise ValidationError("", "wake request must be a JSON object")
        return WakeRequest(model=validate_name(expect_field(obj, "model", str), "model"), at=expect_number(obj, "at"),
                           by=expect_field(obj, "by", str, ""))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "at": self.at, "by": self.by}


def _model_name(value: object) -> str:
    return validate_name(value, "models")
