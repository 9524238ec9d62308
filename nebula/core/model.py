"""Domain types shared by every service, with their JSON form in etcd.

Parsing is strict: a value read from etcd or from a client is validated here, once, and the rest of
the code works with typed, frozen objects.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from nebula.core.elastic import ScalingPolicy
from nebula.core.fields import NAME_RE as NAME_RE
from nebula.core.fields import expect_field as expect_field
from nebula.core.fields import expect_int as expect_int
from nebula.core.fields import expect_int_list as expect_int_list
from nebula.core.fields import expect_number as expect_number
from nebula.core.fields import expect_str_list as expect_str_list
from nebula.core.fields import expect_str_map as expect_str_map
from nebula.core.fields import validate_name as validate_name
from nebula.core.profile import ModelProfile
from nebula.core.sources import parse_source
from nebula.errors import ValidationError

RUNTIME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
REPLICA_SEP = ":"


class Task(enum.StrEnum):
    """What a model serves; decides the engine's runner and which endpoints accept it."""

    GENERATE = "generate"
    EMBED = "embed"
    RERANK = "rerank"
    TRANSCRIBE = "transcribe"  # speech to text (/v1/audio/*): Whisper-class, on vLLM's generate runner


class Phase(enum.StrEnum):
    """Lifecycle of one model instance, as reported by its node agent."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"  # vLLM sleep mode: the engine runs, its weights are off the GPU; not routed to
    DRAINING = "draining"
    FAILED = "failed"


def validate_instance_name(value: object, model: str | None = None) -> str:
    """`<model>` or `<model>:<n>` spelled as instance_name() spells it: instance names become unit names
    and file names on nodes, so nothing else (no '/', no '..', no leading zeros) may pass."""
    if not isinstance(value, str):
        raise ValidationError("instance", "must be a string")
    name, replica = parse_instance_name(value)
    validate_name(name, "instance")
    if replica > 999 or instance_name(name, replica) != value:
        raise ValidationError("instance", f"'{value}' is not <model> or <model>:<replica>")
    if model is not None and name != model:
        raise ValidationError("instance", f"'{value}' is not an instance of model '{model}'")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A desired model (`/nebula/models/<name>`), written by the admin API."""

    name: str
    source: str
    task: Task = Task.GENERATE
    replicas: int = 1
    gpus_per_replica: int = 0
    gpu_memory_mib: int = 0
    engine: str = "vllm"
    engine_args: tuple[str, ...] = ()
    max_model_len: int | None = None
    revision: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    trust_remote_code: bool = False
    """vLLM's --trust-remote-code, never an engine_arg: only where [engine] allow_trust_remote_code permits it."""
    engine_runtime: str | None = None
    """The engine runtime (a venv under [engine] runtimes_dir, e.g. vllm-0.32-cu12); None: the node's default."""
    tensor_parallel_size: int | None = None
    """GPUs one replica shards over (--tensor-parallel-size); None: gpus_per_replica."""
    profile: ModelProfile | None = None
    """What the admin API read from the model's files and derived (parsers, memory need); None: not read."""
    scaling: ScalingPolicy | None = None
    """Elastic capacity (core/elastic.py): bounds, idle unload, priority; None: exactly `replicas`, always."""

    @staticmethod
    def from_dict(obj: object) -> ModelSpec:
        if not isinstance(obj, dict):
            raise ValidationError("", "model spec must be a JSON object")
        name = validate_name(expect_field(obj, "name", str))
        source = expect_field(obj, "source", str)
        if not source.strip():
            raise ValidationError("source", "must not be empty")
        task_raw = expect_field(obj, "task", str, "generate")
        try:
            task = Task(task_raw)
        except ValueError:
            raise ValidationError("task", f"must be one of {', '.join(t.value for t in Task)}") from None
        replicas = expect_field(obj, "replicas", int, 1)
        if replicas < 1 or replicas > 64:
            raise ValidationError("replicas", "must be between 1 and 64 (unload the model to remove it)")
        gpus = expect_field(obj, "gpus_per_replica", int, 0)
        if gpus < 0 or gpus > 16:
            raise ValidationError("gpus_per_replica", "must be between 0 and 16")
        mem = expect_field(obj, "gpu_memory_mib", int, 0)
        if mem < 0:
            raise ValidationError("gpu_memory_mib", "must not be negative")
        engine = expect_field(obj, "engine", str, "vllm")
        if engine != "vllm":
            raise ValidationError("engine", "only 'vllm' is supported")
        args = expect_field(obj, "engine_args", list, [])
        if not all(isinstance(a, str) for a in args):
            raise ValidationError("engine_args", "must be a list of strings")
        max_len = expect_field(obj, "max_model_len", int, None)
        if max_len is not None and max_len < 1:
            raise ValidationError("max_model_len", "must be positive")
        revision = expect_field(obj, "revision", str, None)
        parse_source(source, revision)
        labels = expect_str_map(obj, "labels")
        trust_remote_code: bool = expect_field(obj, "trust_remote_code", bool, False)
        runtime = expect_field(obj, "engine_runtime", str, None)
        if runtime is not None and not RUNTIME_RE.fullmatch(runtime):
            raise ValidationError("engine_runtime", "must be a runtime name such as vllm-0.32-cu12 (lowercase "
                                  "letters, digits, '.', '_' or '-')")
        tp = None if obj.get("tensor_parallel_size") is None else expect_int(obj, "tensor_parallel_size", 1, 16)
        if tp is not None and gpus and tp > gpus:
            raise ValidationError("tensor_parallel_size", f"must not be more than gpus_per_replica ({gpus})")
        profile = None if obj.get("profile") is None else ModelProfile.from_dict(obj["profile"])
        scaling = None if obj.get("scaling") is None else ScalingPolicy.from_dict(obj["scaling"], replicas)
        return ModelSpec(name=name, source=source, task=task, replicas=replicas, gpus_per_replica=gpus,
                         gpu_memory_mib=mem, engine=engine, engine_args=tuple(args), max_model_len=max_len,
                         revision=revision, labels=dict(labels), trust_remote_code=trust_remote_code,
                         engine_runtime=runtime, tensor_parallel_size=tp, profile=profile,
                         scaling=scaling)

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in ("name", "source", "replicas", "gpus_per_replica", "gpu_memory_mib",
                                           "engine", "max_model_len", "revision", "trust_remote_code")}
        d["task"] = self.task.value
        d["engine_args"] = list(self.engine_args)
        d["labels"] = dict(self.labels)
        # New fields only when set: a spec written before they existed reads back equal (same_deployment).
        if self.engine_runtime is not None:
            d["engine_runtime"] = self.engine_runtime
        if self.tensor_parallel_size is not None:
            d["tensor_parallel_size"] = self.tensor_parallel_size
        if self.profile is not None:
            d["profile"] = self.profile.to_dict()
        if self.scaling is not None:
            d["scaling"] = self.scaling.to_dict()
        return d

    @property
    def source_id(self) -> str:
        """Canonical id of the weights (core/sources.py): equal for every spelling of one source."""
        return parse_source(self.source, self.revision).id

    def same_deployment(self, other: ModelSpec) -> bool:
        """True when `other` differs from this spec at most in its replica count."""
        return self.to_dict() | {"replicas": 0} == other.to_dict() | {"replicas": 0}


def instance_name(model: str, replica: int) -> str:
    """Replica 0 is named after its model (`nebula-engine@qwen`), the others `qwen:1`, `qwen:2`..."""
    return model if replica == 0 else f"{model}{REPLICA_SEP}{replica}"


def parse_instance_name(instance: str) -> tuple[str, int]:
    model, sep, idx = instance.rpartition(REPLICA_SEP)
    if sep and idx.isdigit():
        return model, int(idx)
    return instance, 0


@dataclass(frozen=True)
class Gpu:
    index: int
    """NVML's index, which is PCI bus order (engines run with CUDA_DEVICE_ORDER=PCI_BUS_ID to match)."""
    name: str
    memory_total_mib: int
    memory_used_mib: int
    memory_outside_mib: int = 0
    """Memory in use by processes that are not Nebula's engines (and the driver's own): never Nebula's to place."""
    link_group: int = 0
    """GPUs in one group are adjacent (NVLink, or one PCIe switch): the lowest index in the group. Placement
    pins a replica's GPUs inside one group when it can. All 0 where NVML says nothing about topology."""

    @staticmethod
    def from_dict(obj: object) -> Gpu:
        if not isinstance(obj, dict):
            raise ValidationError("gpus", "each GPU must be a JSON object")
        return Gpu(index=expect_int(obj, "index", 0, 1023), name=expect_field(obj, "name", str),
                   memory_total_mib=expect_int(obj, "memory_total_mib", 0, 1 << 40),
                   memory_used_mib=expect_int(obj, "memory_used_mib", 0, 1 << 40),
                   memory_outside_mib=expect_int(obj, "memory_outside_mib", 0, 1 << 40, 0),
                   link_group=expect_int(obj, "link_group", 0, 1023, 0))


@dataclass(frozen=True)
class NodeRecord:
    """A live node (`/nebula/nodes/<node>`), under its agent's lease."""

    name: str
    address: str
    port_min: int
    port_max: int
    gpus: tuple[Gpu, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    agent_version: str = ""
    cached: tuple[str, ...] = ()
    """Canonical ids of the hub sources whose weights this node holds (core/sources.py), sorted."""
    runtimes: tuple[str, ...] = ()
    """Engine runtimes installed on this node ([engine] runtimes_dir, core/engine_runtime.py), sorted."""

    @staticmethod
    def from_dict(obj: object) -> NodeRecord:
        if not isinstance(obj, dict):
            raise ValidationError("", "node record must be a JSON object")
        gpus = tuple(Gpu.from_dict(g) for g in expect_field(obj, "gpus", list, []))
        port_min, port_max = expect_int(obj, "port_min", 1, 65535), expect_int(obj, "port_max", 1, 65535)
        if port_min > port_max:
            raise ValidationError("port_min", "must not be above port_max")
        return NodeRecord(name=validate_name(expect_field(obj, "name", str)), address=expect_field(obj, "address", str),
                          port_min=port_min, port_max=port_max, gpus=gpus, labels=expect_str_map(obj, "labels"),
                          agent_version=expect_field(obj, "agent_version", str, ""),
                          cached=expect_str_list(obj, "cached"), runtimes=_runtimes(obj))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "port_min": self.port_min,
                "port_max": self.port_max, "gpus": [asdict(g) for g in self.gpus],
                "labels": dict(self.labels), "agent_version": self.agent_version, "cached": list(self.cached),
                "runtimes": list(self.runtimes)}


def _runtimes(obj: Mapping[str, Any]) -> tuple[str, ...]:
    names = expect_str_list(obj, "runtimes")
    for name in names:
        if not RUNTIME_RE.fullmatch(name):
            raise ValidationError("runtimes", f"{name!r} is not a runtime name such as vllm-0.32-cu13")
    return tuple(sorted(set(names)))


@dataclass(frozen=True)
class Placement:
    """One instance placed on one node (`/nebula/placements/<node>/<instance>`), by the scheduler leader.

    The placement carries the full model spec, so the agent needs nothing else to run it and a later edit
    of the model is seen as a changed placement.
    """

    instance: str
    node: str
    model: ModelSpec
    port: int
    gpu_indices: tuple[int, ...] = ()
    sleep_level: int = 0
    """0: the engine runs; 1 or 2: the agent puts it to sleep at that vLLM level (ScaleState.sleep_level)."""
    sleep_mode: bool = False
    """Start the engine able to sleep (--enable-sleep-mode): set by the scheduler for a GPU replica of a model
    whose idle action is sleep, so only such engines pay for sleep mode; changing it restarts the engine."""

    @staticmethod
    def from_dict(obj: object) -> Placement:
        if not isinstance(obj, dict):
            raise ValidationError("", "placement must be a JSON object")
        model = ModelSpec.from_dict(expect_field(obj, "model", dict))
        return Placement(instance=validate_instance_name(obj.get("instance"), model.name),
                         node=validate_name(expect_field(obj, "node", str), "node"), model=model,
                         port=expect_int(obj, "port", 1, 65535),
                         gpu_indices=expect_int_list(obj, "gpu_indices", 0, 1023),
                         sleep_level=expect_int(obj, "sleep_level", 0, 2, 0),
                         sleep_mode=expect_field(obj, "sleep_mode", bool, False))

    def to_dict(self) -> dict[str, Any]:
        d = {"instance": self.instance, "node": self.node, "model": self.model.to_dict(),
             "port": self.port, "gpu_indices": list(self.gpu_indices)}
        # Only when asleep: a placement written before sleep mode existed reads back equal.
        if self.sleep_mode:
            d["sleep_mode"] = True
        return d | {"sleep_level": self.sleep_level} if self.sleep_level else d


@dataclass(frozen=True)
class InstanceStatus:
    """Observed state of an instance (`/nebula/instances/<instance>`), by the agent running it."""

    instance: str
    model: str
    node: str
    phase: Phase
    endpoint: str
    task: Task = Task.GENERATE
    since: float = 0.0
    message: str = ""
    restarts: int = 0
    progress: float | None = None
    """Fraction (0-1) of the model's weights downloaded, while the phase is `downloading`; else None."""
    adapters: tuple[str, ...] = ()  # LoRA adapters its engine has loaded (core/lora.py): the gateway routes by them
    adapter_errors: tuple[tuple[str, str], ...] = ()  # (adapter, the engine's message) for each it refused
    history: tuple[tuple[Phase, float], ...] = ()
    """The phases before this one and when each began, oldest first, at most PHASE_HISTORY: how it got here
    (since its agent's current lease; see `with_history`)."""

    @staticmethod
    def from_dict(obj: object) -> InstanceStatus:
        if not isinstance(obj, dict):
            raise ValidationError("", "instance status must be a JSON object")
        try:
            phase = Phase(expect_field(obj, "phase", str))
            task = Task(expect_field(obj, "task", str, "generate"))
        except ValueError as e:
            raise ValidationError("phase", str(e)) from None
        model = validate_name(expect_field(obj, "model", str), "model")
        progress = None if obj.get("progress") is None else expect_number(obj, "progress")
        return InstanceStatus(instance=validate_instance_name(obj.get("instance"), model), model=model,
                              node=validate_name(expect_field(obj, "node", str), "node"), phase=phase,
                              endpoint=expect_field(obj, "endpoint", str),
                              task=task, since=expect_number(obj, "since", 0.0),
                              message=expect_field(obj, "message", str, ""),
                              restarts=expect_int(obj, "restarts", 0, 1 << 31, 0), progress=_fraction(progress),
                              adapters=tuple(sorted(set(expect_str_list(obj, "adapters")))),
                              adapter_errors=tuple(sorted(expect_str_map(obj, "adapter_errors").items())),
                              history=_history(obj.get("history")))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self) | {"phase": self.phase.value, "task": self.task.value, "adapters": list(self.adapters),
                            "adapter_errors": dict(self.adapter_errors),
                            "history": [[p.value, t] for p, t in self.history]}
        # These only when set: a record without them reads as it did before they existed.
        return {k: v for k, v in d.items() if v or k not in ("adapters", "adapter_errors", "history")}


PHASE_HISTORY = 8


def with_history(prev: InstanceStatus | None, new: InstanceStatus) -> InstanceStatus:
    """`new` with `prev`'s history, and `prev`'s phase added when `new` is in another (the last PHASE_HISTORY)."""
    if prev is None:
        return new
    history = prev.history
    if prev.phase is not new.phase:
        history = (*history, (prev.phase, prev.since))[-PHASE_HISTORY:]
    return replace(new, history=history) if history else new


def _history(value: object) -> tuple[tuple[Phase, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > 4 * PHASE_HISTORY:
        raise ValidationError("history", f"must be a list of at most {4 * PHASE_HISTORY} [phase, since] pairs")
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
            raise ValidationError("history", "each entry must be a [phase, since] pair")
        try:
            out.append((Phase(item[0]), float(item[1])))
        except ValueError:
            raise ValidationError("history", f"unknown phase {item[0]!r}") from None
    return tuple(out[-PHASE_HISTORY:])


def _fraction(value: float | None) -> float | None:
    if value is None:
        return None
    if not 0.0 <= value <= 1.0:
        raise ValidationError("progress", "must be between 0 and 1")
    return float(value)


def dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def loads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValidationError("", f"not valid JSON: {e}") from None
    except RecursionError:
        raise ValidationError("", "not valid JSON: nested too deeply") from None
