"""LoRA adapters served at runtime on the replicas of their base model. Pure: records, checks and decisions.

Desired state is an `AdapterSpec` per adapter (`/nebula/adapters/<name>`, written by the admin API); actual
state is what each engine lists as loaded in its own `/v1/models` (an entry with a `parent`), which the
agent reads every pass, so an engine that restarted (and lost its adapters) is seen as such whatever the
agent saw before. `plan_adapters(desired, loaded)` says what to load and unload; the agent applies it and
reports each replica's loaded adapters (and the engine's message for one it refused) in the instance's
status, from which the gateway routes an adapter's requests.

Adapters share the model namespace: vLLM routes by the request's `model`, so an adapter named like a
model would shadow it on the engines that have both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nebula.core.engine_args import flag_name
from nebula.core.model import ModelSpec, expect_field, expect_int, validate_name
from nebula.core.sources import parse_source
from nebula.errors import ValidationError

# vLLM 0.32's LoRAConfig defaults (vllm/config/lora.py): what an engine with --enable-lora alone accepts.
DEFAULT_MAX_LORA_RANK = 16
DEFAULT_MAX_LORAS = 1
MAX_RANK = 1024
RETRY_BASE_S = 2.0
RETRY_CAP_S = 60.0


@dataclass(frozen=True)
class AdapterSpec:
    """A desired LoRA adapter (`/nebula/adapters/<name>`), written by the admin API."""

    name: str
    base: str
    """The loaded model whose replicas serve it (loaded with --enable-lora)."""
    source: str
    """A local adapter directory (adapter_config.json + weights) or a hub repo id, as a model's source."""
    rank: int | None = None
    """Its LoRA rank (`r`), when known: read from its adapter_config.json, or given."""

    @staticmethod
    def from_dict(obj: object) -> AdapterSpec:
        if not isinstance(obj, dict):
            raise ValidationError("", "adapter must be a JSON object")
        name = validate_name(expect_field(obj, "name", str))
        base = validate_name(expect_field(obj, "base", str), "base")
        if base == name:
            raise ValidationError("name", "an adapter cannot be named after its base model")
        source = expect_field(obj, "source", str)
        if not source.strip():
            raise ValidationError("source", "must not be empty")
        if not parse_source(source).is_hub and not source.strip().removeprefix("file://").startswith("/"):
            # Resolved on every node by its agent: a relative path would mean a different place on each.
            raise ValidationError("source", "a local adapter directory must be an absolute path")
        rank = None if obj.get("rank") is None else expect_int(obj, "rank", 1, MAX_RANK)
        return AdapterSpec(name=name, base=base, source=source, rank=rank)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "base": self.base, "source": self.source}
        if self.rank is not None:
            d["rank"] = self.rank
        return d

    @property
    def source_id(self) -> str:
        return parse_source(self.source).id


@dataclass(frozen=True)
class LoraLimits:
    """What an engine started with these flags accepts at runtime."""

    max_rank: int = DEFAULT_MAX_LORA_RANK
    max_loras: int = DEFAULT_MAX_LORAS


def lora_limits(engine_args: Sequence[str]) -> LoraLimits | None:
    """The runtime-LoRA limits of an engine started with `engine_args`; None when LoRA is off (no
    --enable-lora, or its last mention is --no-enable-lora), read as vLLM's parser reads flags."""
    enabled = False
    values: dict[str, int] = {}
    args = list(engine_args)
    for i, arg in enumerate(args):
        name = flag_name(arg)
        if name == "--enable-lora":
            enabled = "=" not in arg or arg.split("=", 1)[1].lower() in ("true", "1", "yes")
        elif name == "--no-enable-lora":
            enabled = False
        elif name in ("--max-lora-rank", "--max-loras"):
            raw = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if raw.isdigit():
                values[name] = int(raw)
    if not enabled:
        return None
    return LoraLimits(max_rank=values.get("--max-lora-rank", DEFAULT_MAX_LORA_RANK),
                      max_loras=values.get("--max-loras", DEFAULT_MAX_LORAS))


def adapter_rank(config: object) -> int | None:
    """The highest rank a PEFT adapter_config.json declares (`r`, and any per-module `rank_pattern`), as vLLM
    checks it against --max-lora-rank; None when the file does not say."""
    if not isinstance(config, dict):
        return None
    ranks = [config.get("r")]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    found = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool) and r > 0]
    return max(found) if found else None


def check_adapter(spec: AdapterSpec, base: ModelSpec, file_rank: int | None) -> AdapterSpec:
    """`spec` as stored: its rank the one its files declare (when readable), checked against what its base's
    engines accept. ValidationError (400) naming the fix otherwise."""
    limits = lora_limits((base.profile.family_args() if base.profile else ()) + base.engine_args)
    if limits is None:
        raise ValidationError("base", f"model '{base.name}' was not loaded with --enable-lora: load the base "
                              "with --engine-arg=--enable-lora (and --engine-arg=--max-lora-rank=N for ranks above "
                              f"{DEFAULT_MAX_LORA_RANK}) to serve adapters on it")
    rank = file_rank if file_rank is not None else spec.rank
    if rank is not None and rank > limits.max_rank:
        raise ValidationError("rank", f"adapter rank {rank} is above the --max-lora-rank of '{base.name}' "
                              f"({limits.max_rank}): load the base with --engine-arg=--max-lora-rank={rank} or "
                              "more")
    return AdapterSpec(spec.name, spec.base, spec.source, rank)


def engine_adapters(models: object) -> dict[str, str]:
    """The adapters an engine has loaded, name -> path, from its `/v1/models` answer (entries with a parent;
    `root` is the path it was loaded from). Anything malformed counts as nothing loaded."""
    data = models.get("data") if isinstance(models, dict) else None
    out: dict[str, str] = {}
    for entry in data if isinstance(data, list) else ():
        if isinstance(entry, dict) and entry.get("parent") and isinstance(entry.get("id"), str):
            root = entry.get("root")
            out[entry["id"]] = root if isinstance(root, str) else ""
    return out


@dataclass(frozen=True)
class LoadAdapter:
    name: str
    path: str
    reason: str


@dataclass(frozen=True)
class UnloadAdapter:
    name: str
    reason: str


AdapterAction = LoadAdapter | UnloadAdapter


def plan_adapters(desired: Mapping[str, str], loaded: Mapping[str, str]) -> list[AdapterAction]:
    """What makes an engine's loaded adapters (name -> path) equal `desired` (name -> path): unloads first
    (they free the engine's slots), each list in name order."""
    unloads: list[AdapterAction] = []
    loads: list[AdapterAction] = []
    for name in sorted(loaded):
        if name not in desired:
            unloads.append(UnloadAdapter(name, "removed"))
        elif loaded[name] != desired[name]:
            unloads.append(UnloadAdapter(name, f"source changed to {desired[name]}"))
    for name in sorted(desired):
        if name not in loaded:
            loads.append(LoadAdapter(name, desired[name], "not loaded"))
        elif loaded[name] != desired[name]:
            loads.append(LoadAdapter(name, desired[name], "source changed"))
    return unloads + loads


@dataclass
class LoadRetries:
    """When to try an adapter the engine refused again: after RETRY_BASE_S, doubling up to RETRY_CAP_S per
    failure in a row. Keyed by (instance, adapter, path): a changed source or a new engine is a fresh try.
    Pure: the caller passes the time."""

    base_s: float = RETRY_BASE_S
    cap_s: float = RETRY_CAP_S
    _failures: dict[tuple[str, str, str], tuple[int, float]] = field(default_factory=dict)

    def failed(self, key: tuple[str, str, str], now: float) -> float:
        """Record a failure; returns the delay before the next try."""
        count = self._failures.get(key, (0, 0.0))[0] + 1
        delay = min(self.cap_s, self.base_s * float(2 ** min(count - 1, 32)))
        self._failures[key] = (count, now + delay)
        return delay

    def due(self, key: tuple[str, str, str], now: float) -> bool:
        entry = self._failures.get(key)
        return entry is None or now >= entry[1]

    def succeeded(self, key: tuple[str, str, str]) -> None:
        self._failures.pop(key, None)

    def keep_only(self, keys: set[tuple[str, str, str]]) -> None:
        """Forget the failures of what is no longer wanted, so it starts afresh if wanted again."""
        for key in [k for k in self._failures if k not in keys]:
            del self._failures[key]


class AdapterRefused(Exception):
    """The engine answered a load or unload with an error; the message is the engine's own."""


class EngineAdapters(Protocol):
    """An engine's runtime-LoRA endpoints (nebula/adapters/engine_lora.py). Each raises TemporaryError when
    the engine cannot be reached, AdapterRefused when it answers with an error."""

    async def loaded(self, endpoint: str) -> dict[str, str]:
        """The adapters the engine at `endpoint` has loaded, name -> path (engine_adapters)."""
        ...

    async def load(self, endpoint: str, name: str, path: str) -> None: ...

    async def unload(self, endpoint: str, name: str) -> None:
        """Unload `name`; one the engine does not have counts as unloaded."""
        ...
