"""GPU memory that does not come back after an engine stops (core/gpu_release.py), on a clock the test
moves, and how the agent shows it on /metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nebula.adapters.nvml import GpuReading, ProcessMemory
from nebula.core.gpu_release import ReleaseTracker
from nebula.core.gpu_usage import GpuProcess, GpuUsage
from nebula.core.model import Gpu
from nebula.errors import ValidationError
from nebula.services.agent.gpus import EngineView, GpuCollector, GpuSampler

GIB = 1024
RUNNING = frozenset({"chat"})
NONE: frozenset[str] = frozenset()


def usage(chat_gib: int = 0, unlisted_gib: float = 0.5, gpu: int = 0) -> GpuUsage:
    by_engine = {"chat": chat_gib * GIB} if chat_gib else {}
    return GpuUsage(gpu, 80 * GIB, int((chat_gib + unlisted_gib) * GIB), by_engine)


def tracker() -> ReleaseTracker:
    return ReleaseTracker(timeout_s=120, slack_mib=256)


def test_memory_that_comes_back_in_time_raises_nothing() -> None:
    t = tracker()
    t.observe(0, [usage(40)], RUNNING)
    t.observe(10, [usage(40)], NONE)  # stopped; vLLM still tearing down
    assert [r.left_mib for r in t.waiting()] == [40 * GIB]
    t.observe(60, [usage(0)], NONE)
    t.observe(500, [usage(0)], NONE)
    assert t.waiting() == [] and t.unreleased_mib([0]) == {0: 0} and t.overdue_total == 0


def test_a_worker_left_behind_is_reported_after_the_bound_and_cleared_when_it_goes() -> None:
    t = tracker()
    t.observe(0, [usage(40)], RUNNING)
    t.observe(5, [usage(38)], NONE)  # the engine's unit is down, a worker of it still holds 38 GiB
    t.observe(124, [usage(38)], NONE)
    assert t.unreleased_mib([0, 1]) == {0: 0, 1: 0}  # not yet: the bound counts from the stop (5 s)
    t.observe(125, [usage(38)], NONE)
    assert t.unreleased_mib([0, 1]) == {0: 38 * GIB, 1: 0}
    assert t.overdue_total == 1
    t.observe(200, [usage(38)], NONE)
    assert t.overdue_total == 1  # counted once
    t.observe(300, [usage(0)], NONE)  # the operator killed it
    assert t.unreleased_mib([0]) == {0: 0} and t.overdue_total == 1


def test_memory_left_in_the_driver_with_no_process_is_reported() -> None:
    t = tracker()
    t.observe(0, [usage(40)], RUNNING)
    t.observe(1, [usage(0, unlisted_gib=40.5)], NONE)  # no process holds it, yet it is used
    t.observe(200, [usage(0, unlisted_gib=40.5)], NONE)
    assert t.unreleased_mib([0]) == {0: 40 * GIB}


def test_outside_use_that_grows_is_not_blamed_beyond_what_the_engine_held() -> None:
    t = tracker()
    t.observe(0, [usage(10)], RUNNING)
    t.observe(1, [usage(0, unlisted_gib=60.5)], NONE)
    t.observe(200, [usage(0, unlisted_gib=60.5)], NONE)
    assert t.unreleased_mib([0]) == {0: 10 * GIB}


def test_a_restarted_engine_takes_its_memory_anew() -> None:
    t = tracker()
    t.observe(0, [usage(40)], RUNNING)
    t.observe(1, [usage(40)], NONE)
    t.observe(30, [usage(40)], RUNNING)
    t.observe(500, [usage(40)], RUNNING)
    assert t.waiting() == [] and t.overdue_total == 0


def test_memory_of_an_engine_never_seen_running_waits_from_the_first_reading() -> None:
    t = tracker()  # an agent restarted after the stop finds the worker on the GPU
    t.observe(1000, [usage(20)], NONE)
    t.observe(1119, [usage(20)], NONE)
    assert t.unreleased_mib([0]) == {0: 0}
    t.observe(1120, [usage(20)], NONE)
    assert t.unreleased_mib([0]) == {0: 20 * GIB}


def test_each_gpu_of_a_tensor_parallel_engine_is_tracked() -> None:
    t = tracker()
    t.observe(0, [usage(40, gpu=0), usage(40, gpu=1)], RUNNING)
    t.observe(1, [usage(0, gpu=0), usage(40, gpu=1)], NONE)
    t.observe(200, [usage(0, gpu=0), usage(40, gpu=1)], NONE)
    assert t.unreleased_mib([0, 1]) == {0: 0, 1: 40 * GIB}


def test_a_gpu_record_refuses_negative_outside_use() -> None:
    with pytest.raises(ValidationError, match="memory_outside_mib"):
        Gpu.from_dict({"index": 0, "name": "A", "memory_total_mib": 1, "memory_used_mib": 0,
                       "memory_outside_mib": -1})


def test_agent_exports_outside_use_and_unreleased_memory() -> None:
    clock = [0.0]

    def read() -> tuple[tuple[GpuReading, ...], str]:
        return (GpuReading(index=0, name="NVIDIA H200", uuid="GPU-1", memory_total_bytes=141 * 2**30,
                           memory_used_bytes=41 * 2**30, processes=(ProcessMemory(77, 40 * 2**30),)),), ""

    sampler = GpuSampler(read, "n1", tracker=tracker(), clock=lambda: clock[0],
                         read_proc=lambda pid, mib: GpuProcess(pid, mib, session=77))
    registry = CollectorRegistry()
    registry.register(GpuCollector(sampler))
    sampler.engines = EngineView(running=frozenset({"chat"}), sessions={77: "chat"})
    sampler.sample()
    sampler.engines = EngineView()
    for clock[0] in (1.0, 200.0):
        sampler.sample()
    values = {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
              for s in f.samples}
    assert values["nebula_agent_gpu_memory_unreleased_bytes"] == 40 * 2**30
    # What the left-behind worker holds is no more placeable than a stranger's memory.
    assert values["nebula_gpu_memory_outside_bytes"] == 41 * 2**30
    assert values["nebula_agent_gpu_memory_release_overdue_total"] == 1
