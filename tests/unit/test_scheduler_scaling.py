"""The scheduler's elastic capacity against the in-memory store, on controllable clocks: load reports and wake
requests in (written as a gateway worker would), scale states, placements and decision counts out."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.elastic import LoadReport, ModelLoad, ScaleState, WakeRequest
from nebula.core.model import Gpu, ModelSpec, NodeRecord, Placement, dumps, loads
from nebula.core.scaling import ScalingDefaults
from nebula.services.cluster.writes import Fence
from nebula.services.scheduler.scheduler import Scheduler
from tests.harness.mirrors import feed_scheduler

DEFAULTS = ScalingDefaults(up_window_s=30, down_window_s=60, cooldown_s=30, target_inflight=4, report_stale_s=15)


class Wall:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def node(name: str, gpus: int = 0, mem: int = 24_000) -> bytes:
    return dumps(NodeRecord(name=name, address="127.0.0.1", port_min=18000, port_max=18100,
                            gpus=tuple(Gpu(i, "H100", mem, 0) for i in range(gpus))).to_dict())


def model(name: str, replicas: int = 1, gpus: int = 0, mem: int = 0, **scaling: Any) -> bytes:
    obj: dict[str, Any] = {"name": name, "source": "/m", "replicas": replicas, "gpus_per_replica": gpus,
                           "gpu_memory_mib": mem}
    if scaling:
        obj["scaling"] = scaling
    return dumps(ModelSpec.from_dict(obj).to_dict())


class Cluster:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.store = MemoryStore()
        self.wall = Wall()
        self.registry = registry or CollectorRegistry()
        self.sched = Scheduler(self.store, "s1", lease_ttl_s=10, node_grace_s=30, resync_s=5,
                               registry=self.registry, scaling=DEFAULTS, wall=self.wall, evict_quiet_s=60)

    async def report(self, **models: ModelLoad) -> None:
        """One gateway worker's report, now."""
        r = LoadReport(reporter="gw.1", at=self.wall.now, models=models)
        await self.store.put(keys.load_key(r.reporter), dumps(r.to_dict()))

    async def run_for(self, seconds: float, tick: float = 5.0, **models: ModelLoad) -> None:
        """Passes every `tick` seconds with the same load reported each time."""
        end = self.wall.now + seconds
        while self.wall.now < end:
            self.wall.now += tick
            await self.report(**models)
            await self.step()

    async def step(self) -> None:
        await feed_scheduler(self.store, self.sched)
        await self.sched.schedule_once()
        await feed_scheduler(self.store, self.sched)

    async def scale(self, name: str) -> ScaleState | None:
        kv = await self.store.get(keys.scale_key(name))
        return None if kv is None else ScaleState.from_dict(loads(kv.value))

    async def placements(self) -> dict[str, Placement]:
        snap = await self.store.list_prefix(keys.PLACEMENTS)
        return {p.instance: p for p in (Placement.from_dict(loads(kv.value)) for kv in snap.items)}

    def decisions(self, name: str, action: str) -> float:
        return self.registry.get_sample_value("nebula_scheduler_scaling_decisions_total",
                                              {"model": name, "action": action}) or 0.0


async def test_load_scales_1_to_2_and_back_then_idle_unloads_and_a_wake_brings_it_back() -> None:
    c = Cluster()
    await c.store.put(keys.node_key("n1"), node("n1"))
    await c.store.put(keys.model_key("m"), model("m", min_replicas=0, max_replicas=2, idle_unload_s=600))
    await c.report()
    await c.step()
    st = await c.scale("m")
    assert st is not None and st.replicas == 1 and st.reason == "loaded with 1 replica"
    assert set(await c.placements()) == {"m"}

    await c.run_for(40, m=ModelLoad(inflight=10, last_request=c.wall.now))
    st = await c.scale("m")
    assert st is not None and st.replicas == 2 and "1 -> 2 replicas" in st.reason
    assert set(await c.placements()) == {"m", "m:1"}

    await c.run_for(100, m=ModelLoad(last_request=c.wall.now))
    assert (await c.scale("m")).replicas == 1  # type: ignore[union-attr]
    assert set(await c.placements()) == {"m"}

    await c.run_for(700, m=ModelLoad(last_request=c.wall.now - 100))
    st = await c.scale("m")
    assert st is not None and st.replicas == 0 and st.reason.startswith("idle: no inference request")
    assert await c.placements() == {}
    assert c.sched.pending == {}  # a model at 0 is idle, not pending
    assert (await c.store.get(keys.model_status_key("m"))) is None

    wake = WakeRequest(model="m", at=c.wall.now, by="gw.1")
    await c.store.put(keys.wake_key("m"), dumps(wake.to_dict()))
    await c.step()
    st = await c.scale("m")
    assert st is not None and st.replicas == 1 and st.reason.startswith("woken by a wake request")
    assert set(await c.placements()) == {"m"}
    assert await c.store.get(keys.wake_key("m")) is None
    assert [c.decisions("m", a) for a in ("up", "down", "unload", "wake")] == [1, 1, 1, 1]
    assert c.registry.get_sample_value("nebula_scheduler_scale_replicas", {"model": "m"}) is None  # a standby's
    c.sched.is_leader = True
    assert c.registry.get_sample_value("nebula_scheduler_scale_replicas", {"model": "m"}) == 1
    assert c.registry.get_sample_value("nebula_scheduler_scale_sleep_level", {"model": "m"}) == 0


async def test_a_running_stream_keeps_an_idle_model_loaded() -> None:
    c = Cluster()
    await c.store.put(keys.node_key("n1"), node("n1"))
    await c.store.put(keys.model_key("m"), model("m", idle_unload_s=60))
    await c.report()
    await c.step()
    started = c.wall.now
    await c.run_for(600, m=ModelLoad(inflight=1, last_request=started))
    assert (await c.scale("m")).replicas == 1  # type: ignore[union-attr]
    await c.run_for(10, m=ModelLoad(last_request=started))
    assert (await c.scale("m")).replicas == 0  # type: ignore[union-attr]


async def test_a_deposed_leaders_scale_write_is_refused() -> None:
    c = Cluster()
    await c.store.put(keys.node_key("n1"), node("n1"))
    await c.store.put(keys.model_key("m"), model("m", idle_unload_s=60))
    other = await c.store.grant_lease(10)
    await c.store.put(keys.SCHEDULER_LEADER, b"s2", lease=other)
    c.sched._fence = Fence(await c.store.grant_lease(10))  # our lease, but the key is another's
    await c.report()
    await c.step()
    assert await c.scale("m") is None and await c.placements() == {}
    assert c.sched.fenced_writes == 1 and c.sched.lost_lead.is_set()


async def test_a_wake_for_a_model_that_is_gone_is_cleared_and_so_is_its_scale_state() -> None:
    c = Cluster()
    await c.store.put(keys.node_key("n1"), node("n1"))
    await c.store.put(keys.scale_key("gone"), dumps(ScaleState(model="gone", replicas=0).to_dict()))
    await c.store.put(keys.wake_key("gone"), dumps(WakeRequest(model="gone", at=1.0).to_dict()))
    await c.report()
    await c.step()
    assert await c.store.get(keys.scale_key("gone")) is None and await c.store.get(keys.wake_key("gone")) is None


async def test_sleep_on_gpu_marks_the_placements_and_level_2_frees_the_gpu() -> None:
    c = Cluster()
    await c.store.put(keys.node_key("g"), node("g", gpus=1, mem=24_000))
    await c.store.put(keys.model_key("m"), model("m", gpus=1, mem=20_000, idle_unload_s=60, idle_action="sleep",
                                                 sleep_level=2))
    await c.report()
    await c.step()
    await c.run_for(70)
    st = await c.scale("m")
    assert st is not None and (st.replicas, st.sleep_level) == (1, 2)
    assert (await c.placements())["m"].sleep_level == 2 and (await c.placements())["m"].sleep_mode
    assert c.decisions("m", "sleep") == 1
    # Its 20 GB are free for another model now.
    await c.store.put(keys.model_key("other"), model("other", gpus=1, mem=20_000))
    await c.step()
    assert (await c.placements())["other"].node == "g"
    await c.store.put(keys.wake_key("m"), dumps(WakeRequest(model="m", at=c.wall.now).to_dict()))
    await c.step()
    assert (await c.placements())["m"].sleep_level == 0


async def test_a_higher_priority_model_evicts_an_idle_lower_one_never_a_busy_one() -> None:
    c = Cluster()
    await c.store.put(keys.node_key("g"), node("g", gpus=1, mem=24_000))
    await c.store.put(keys.model_key("low"), model("low", gpus=1, mem=20_000, idle_unload_s=3600, priority=1))
    await c.report()
    await c.step()
    await c.store.put(keys.model_key("high"), model("high", gpus=1, mem=20_000, idle_unload_s=3600, priority=5))
    # Busy: never evicted, however long.
    await c.run_for(120, low=ModelLoad(inflight=1, last_request=c.wall.now))
    assert set(await c.placements()) == {"low"} and "high" in c.sched.pending
    # Quiet for less than evict_quiet_s: not yet.
    quiet_from = c.wall.now
    await c.run_for(30, low=ModelLoad(last_request=quiet_from))
    assert set(await c.placements()) == {"low"}
    await c.run_for(40, low=ModelLoad(last_request=quiet_from))
    st = await c.scale("low")
    assert st is not None and st.replicas == 0 and st.reason.startswith("evicted for high (priority 5 over 1)")
    assert set(await c.placements()) == {"high"} and c.sched.pending == {}
    assert c.decisions("low", "evict") == 1


async def test_an_eviction_that_frees_nothing_useful_is_not_made() -> None:
    c = Cluster()
    await c.store.put(keys.node_key("g"), node("g", gpus=1, mem=24_000))
    await c.store.put(keys.model_key("low"), model("low", gpus=1, mem=4_000, idle_unload_s=3600, priority=1))
    await c.report()
    await c.step()
    # Needs two GPUs: no eviction on a one-GPU node can help.
    await c.store.put(keys.model_key("big"), model("big", gpus=2, mem=4_000, priority=5))
    await c.run_for(200)
    assert set(await c.placements()) == {"low"} and "big" in c.sched.pending
    assert c.decisions("low", "evict") == 0


async def test_a_cpu_model_whose_action_is_sleep_stops_instead_and_its_engine_has_no_sleep_mode() -> None:
    c = Cluster()
    await c.store.put(keys.node_key("n1"), node("n1"))
    await c.store.put(keys.model_key("m"), model("m", idle_unload_s=60, idle_action="sleep"))
    await c.report()
    await c.step()
    assert not (await c.placements())["m"].sleep_mode
    await c.run_for(70)
    st = await c.scale("m")
    assert st is not None and st.replicas == 0 and "CUDA-only" in st.reason
    assert c.decisions("m", "unload") == 1 and c.decisions("m", "sleep") == 0
