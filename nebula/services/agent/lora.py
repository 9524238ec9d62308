"""The agent's LoRA applier: each healthy replica of a base with runtime LoRA gets exactly its desired adapters.

Desired: the adapter records (mirror of /nebula/adapters/) whose base is the replica's model, each source
resolved on this node (a local directory as is; a hub id through the same download machinery as a model's
weights). Actual: the engine's own list (core/lora.py engine_adapters), read when something may have changed
(a new or newly healthy engine, a changed desired set, a retry due) and at least every RECHECK_S. The pure
plan decides; this applies it, one engine call at a time. A load the engine refuses is reported with the
engine's message in the instance's status and tried again with backoff; nothing here stops a pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path

from nebula.core.engine_spec import EngineSpec
from nebula.core.lora import (
    AdapterRefused,
    AdapterSpec,
    EngineAdapters,
    LoadAdapter,
    LoadRetries,
    UnloadAdapter,
    lora_limits,
    plan_adapters,
)
from nebula.core.sources import parse_source
from nebula.errors import TemporaryError, ValidationError
from nebula.services.agent.sources import Broken, ModelSources, Ready, Resolution
from nebula.services.cluster.mirror import MirrorState

log = logging.getLogger("nebula.agent")

RECHECK_S = 10.0


@dataclass(frozen=True)
class ReplicaAdapters:
    """What one replica reports: the adapters its engine has loaded, and the refusals (adapter -> message)."""

    loaded: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = ()


@dataclass
class _Seen:
    desired: dict[str, str]
    broken: dict[str, str]
    checked_at: float
    report: ReplicaAdapters


class LoraSync:
    def __init__(self, engine: EngineAdapters | None, sources: ModelSources, clock: Callable[[], float],
                 node: str = "") -> None:
        self.engine = engine  # None: this agent does not manage adapters (tests of other parts)
        self.sources = sources
        self.clock = clock
        self.node = node
        self.adapters: dict[str, AdapterSpec] = {}
        self.retries = LoadRetries()
        self._seen: dict[str, _Seen] = {}

    def on_adapters(self, state: MirrorState[AdapterSpec]) -> None:
        self.adapters = {a.name: a for a in state.records.values()}

    def source_ids(self) -> set[str]:
        """The hub sources of adapters this node serves (kept from the source cache's clean-up)."""
        return {a.source_id for a in self.adapters.values()}

    def report(self, instance: str) -> ReplicaAdapters:
        seen = self._seen.get(instance)
        return seen.report if seen is not None else ReplicaAdapters()

    def desired(self, spec: EngineSpec) -> tuple[dict[str, str], dict[str, str]]:
        """The adapters `spec`'s engine should have (name -> local path), and those that cannot be had yet
        (name -> why: the source is broken). One still downloading is in neither."""
        want: dict[str, str] = {}
        broken: dict[str, str] = {}
        for a in sorted(self.adapters.values(), key=lambda a: a.name):
            if a.base != spec.model:
                continue
            res = self.resolve(a.source)
            if isinstance(res, Ready):
                want[a.name] = res.path
            elif isinstance(res, Broken):
                broken[a.name] = res.message
        return want, broken

    def resolve(self, source: str) -> Resolution:
        """Where an adapter's files are on this node: a local directory must hold adapter_config.json (a model's
        source needs a config.json instead); a hub id is fetched into the node's cache like a model's weights."""
        try:
            ref = parse_source(source)
        except ValidationError as e:
            return Broken(e.message)
        if ref.is_hub:
            return self.sources.resolve(source)
        path = Path(ref.location)
        if not (path / "adapter_config.json").is_file():
            return Broken(f"{ref.location} on this node is not a LoRA adapter directory (no adapter_config.json)")
        return Ready(str(path.resolve()))

    async def sync(self, specs: Mapping[str, EngineSpec], healthy: Set[str]) -> None:
        """One pass over the running engines (`specs`: their spec files; `healthy`: those answering)."""
        for inst in [i for i in self._seen if i not in healthy or i not in specs]:
            del self._seen[inst]  # down or gone: a new engine starts with nothing loaded
        if self.engine is None:
            return
        wanted: set[tuple[str, str, str]] = set()
        for inst in sorted(healthy):
            spec = specs.get(inst)
            if spec is None or lora_limits(spec.engine_args) is None:
                continue
            desired, broken = self.desired(spec)
            wanted |= {(inst, name, path) for name, path in desired.items()}
            try:
                await self._sync_one(self.engine, spec, desired, broken)
            except TemporaryError as e:  # the engine went away meanwhile: its health check will say so
                log.info("adapters of %s not synced: %s", inst, e, extra={"NEBULA_INSTANCE": inst})
        self.retries.keep_only(wanted)

    async def _sync_one(self, engine: EngineAdapters, spec: EngineSpec, desired: dict[str, str],
                        broken: dict[str, str]) -> None:
        inst, now = spec.instance, self.clock()
        seen = self._seen.get(inst)
        refused = dict(seen.report.errors) if seen is not None else {}
        retry_due = any(self.retries.due((inst, n, p), now) for n, p in desired.items() if n in refused)
        if (seen is not None and seen.desired == desired and seen.broken == broken and not retry_due
                and now - seen.checked_at < RECHECK_S):
            return  # nothing changed that the engine's list could tell
        loaded = await engine.loaded(spec.endpoint)
        errors = dict(broken)
        fields = {"NEBULA_INSTANCE": inst, "NEBULA_NODE": self.node, "NEBULA_MODEL": spec.model}
        for action in plan_adapters(desired, loaded):
            if isinstance(action, UnloadAdapter):
                try:
                    await engine.unload(spec.endpoint, action.name)
                    loaded.pop(action.name, None)
                    log.info("unloaded LoRA adapter %s from %s (%s)", action.name, inst, action.reason, extra=fields)
                except AdapterRefused as e:
                    log.warning("engine %s refused to unload LoRA adapter %s: %s", inst, action.name, e, extra=fields)
                continue
            assert isinstance(action, LoadAdapter)
            key = (inst, action.name, action.path)
            if not self.retries.due(key, now):
                errors[action.name] = refused.get(action.name, "")
                continue
            try:
                await engine.load(spec.endpoint, action.name, action.path)
            except AdapterRefused as e:
                delay = self.retries.failed(key, now)
                errors[action.name] = str(e)
                log.warning("engine %s refused LoRA adapter %s (%s), trying again in %.0f s: %s", inst, action.name,
                            action.path, delay, e, extra=fields | {"NEBULA_ADAPTER": action.name})
                continue
            self.retries.succeeded(key)
            loaded[action.name] = action.path
            log.info("loaded LoRA adapter %s on %s from %s", action.name, inst, action.path,
                     extra=fields | {"NEBULA_ADAPTER": action.name})
        report = ReplicaAdapters(loaded=tuple(sorted(loaded)),
                                 errors=tuple(sorted((n, m or "refused by the engine") for n, m in errors.items())))
        self._seen[inst] = _Seen(desired=desired, broken=broken, checked_at=now, report=report)
