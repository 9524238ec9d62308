"""The agent's LoRA applier (services/agent/lora.py) against an in-memory engine: loads what is desired on each
healthy replica of a LoRA-enabled base, again after a restart, unloads what was removed, reports the engine's
refusals and retries them with backoff, and never stops on an engine that went away."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nebula.core.config import NodeConfig
from nebula.core.engine_spec import EngineSpec
from nebula.core.lora import RETRY_BASE_S, AdapterRefused, AdapterSpec
from nebula.errors import TemporaryError
from nebula.services.agent.lora import RECHECK_S, LoraSync, ReplicaAdapters
from nebula.services.agent.sources import build_sources
from nebula.services.cluster.mirror import MirrorState


@dataclass
class MemoryEngines:
    """Engines by endpoint: what each has loaded, and what it refuses (path -> message)."""

    held: dict[str, dict[str, str]] = field(default_factory=dict)
    refuse: dict[str, str] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def _up(self, endpoint: str) -> dict[str, str]:
        if endpoint in self.down:
            raise TemporaryError(f"{endpoint} refused the connection")
        return self.held.setdefault(endpoint, {})

    async def loaded(self, endpoint: str) -> dict[str, str]:
        return dict(self._up(endpoint))

    async def load(self, endpoint: str, name: str, path: str) -> None:
        engine = self._up(endpoint)
        self.calls.append(("load", endpoint, name))
        if path in self.refuse:
            raise AdapterRefused(self.refuse[path])
        engine[name] = path

    async def unload(self, endpoint: str, name: str) -> None:
        self.calls.append(("unload", endpoint, name))
        self._up(endpoint).pop(name, None)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(instance: str, port: int, lora: bool = True) -> EngineSpec:
    return EngineSpec(instance=instance, model=instance.split(":")[0], source="/models/tiny", port=port,
                      engine_args=("--enable-lora", "--max-lora-rank=8") if lora else ())


def adapter_dir(root: Path, name: str) -> str:
    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return str(d)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engines() -> MemoryEngines:
    return MemoryEngines()


@pytest.fixture
def sync(tmp_path: Path, engines: MemoryEngines, clock: Clock) -> LoraSync:
    sources = build_sources(NodeConfig(cache_dir=str(tmp_path / "cache")), CollectorRegistry())
    return LoraSync(engines, sources, clock, "n1")


def desire(sync: LoraSync, *adapters: AdapterSpec) -> None:
    sync.on_adapters(MirrorState(records={a.name: a for a in adapters}))


SPECS = {"pair": spec("pair", 18000), "pair:1": spec("pair:1", 18001), "chat": spec("chat", 18002, lora=False)}
EP = {i: s.endpoint for i, s in SPECS.items()}


async def test_every_healthy_replica_of_the_base_loads_the_adapter_and_reports_it(
        sync: LoraSync, engines: MemoryEngines, tmp_path: Path) -> None:
    tone = adapter_dir(tmp_path, "tone")
    desire(sync, AdapterSpec("tone", "pair", tone), AdapterSpec("other", "chat", tone))
    await sync.sync(SPECS, {"pair", "pair:1", "chat"})
    assert engines.held == {EP["pair"]: {"tone": tone}, EP["pair:1"]: {"tone": tone}}  # chat has no LoRA
    assert sync.report("pair") == sync.report("pair:1") == ReplicaAdapters(loaded=("tone",))
    assert sync.report("chat") == ReplicaAdapters()


async def test_a_restarted_engine_gets_its_adapters_again(sync: LoraSync, engines: MemoryEngines, clock: Clock,
                                                          tmp_path: Path) -> None:
    tone = adapter_dir(tmp_path, "tone")
    desire(sync, AdapterSpec("tone", "pair", tone))
    await sync.sync(SPECS, {"pair", "pair:1"})
    engines.held[EP["pair:1"]] = {}  # its engine restarted: a new one has nothing loaded
    await sync.sync(SPECS, {"pair"})  # ...and was not healthy for a while
    assert sync.report("pair:1") == ReplicaAdapters()
    clock.now += 1
    await sync.sync(SPECS, {"pair", "pair:1"})
    assert engines.held[EP["pair:1"]] == {"tone": tone}
    assert sync.report("pair:1").loaded == ("tone",)


async def test_an_engine_that_lost_its_adapters_unseen_gets_them_within_the_recheck(
        sync: LoraSync, engines: MemoryEngines, clock: Clock, tmp_path: Path) -> None:
    tone = adapter_dir(tmp_path, "tone")
    desire(sync, AdapterSpec("tone", "pair", tone))
    await sync.sync(SPECS, {"pair"})
    engines.held[EP["pair"]] = {}
    clock.now += 1
    await sync.sync(SPECS, {"pair"})  # nothing changed that the agent saw: the engine is not asked
    assert engines.held[EP["pair"]] == {}
    clock.now += RECHECK_S
    await sync.sync(SPECS, {"pair"})
    assert engines.held[EP["pair"]] == {"tone": tone}


async def test_a_removed_adapter_is_unloaded(sync: LoraSync, engines: MemoryEngines, tmp_path: Path) -> None:
    tone, sql = adapter_dir(tmp_path, "tone"), adapter_dir(tmp_path, "sql")
    desire(sync, AdapterSpec("tone", "pair", tone), AdapterSpec("sql", "pair", sql))
    await sync.sync(SPECS, {"pair"})
    desire(sync, AdapterSpec("sql", "pair", sql))
    await sync.sync(SPECS, {"pair"})
    assert engines.held[EP["pair"]] == {"sql": sql}
    assert sync.report("pair").loaded == ("sql",)


async def test_a_refused_load_is_reported_with_the_engines_message_and_retried_with_backoff(
        sync: LoraSync, engines: MemoryEngines, clock: Clock, tmp_path: Path) -> None:
    big = adapter_dir(tmp_path, "big")
    engines.refuse[big] = "LoRA rank 16 is greater than max_lora_rank 8."
    desire(sync, AdapterSpec("big", "pair", big))
    await sync.sync(SPECS, {"pair"})
    assert sync.report("pair") == ReplicaAdapters(errors=(("big", "LoRA rank 16 is greater than max_lora_rank 8."),))
    clock.now += RETRY_BASE_S / 2
    await sync.sync(SPECS, {"pair"})
    assert len(engines.calls) == 1  # not yet
    assert sync.report("pair").errors  # still reported
    clock.now += RETRY_BASE_S
    await sync.sync(SPECS, {"pair"})
    assert len(engines.calls) == 2
    del engines.refuse[big]  # fixed (say, the files were replaced)
    clock.now += 2 * RETRY_BASE_S
    await sync.sync(SPECS, {"pair"})
    assert sync.report("pair") == ReplicaAdapters(loaded=("big",))


async def test_a_source_that_is_no_adapter_is_reported_without_asking_the_engine(
        sync: LoraSync, engines: MemoryEngines, tmp_path: Path) -> None:
    desire(sync, AdapterSpec("ghost", "pair", str(tmp_path / "missing")))
    await sync.sync(SPECS, {"pair"})
    assert engines.calls == []
    (name, message), = sync.report("pair").errors
    assert name == "ghost" and "adapter_config.json" in message


async def test_an_engine_that_went_away_costs_nothing_but_its_own_sync(sync: LoraSync, engines: MemoryEngines,
                                                                       tmp_path: Path) -> None:
    tone = adapter_dir(tmp_path, "tone")
    desire(sync, AdapterSpec("tone", "pair", tone))
    engines.down.add(EP["pair"])
    await sync.sync(SPECS, {"pair", "pair:1"})
    assert engines.held == {EP["pair:1"]: {"tone": tone}}
    assert sync.report("pair") == ReplicaAdapters()


async def test_without_an_engine_client_nothing_is_managed(tmp_path: Path) -> None:
    sync = LoraSync(None, build_sources(NodeConfig(cache_dir=str(tmp_path)), CollectorRegistry()), Clock())
    desire(sync, AdapterSpec("tone", "pair", adapter_dir(tmp_path, "tone")))
    await sync.sync(SPECS, {"pair"})
    assert sync.report("pair") == ReplicaAdapters()
