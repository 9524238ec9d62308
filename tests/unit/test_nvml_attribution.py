"""Whose memory is on a GPU (core/gpu_usage.py), from /proc fixtures (tests/fixtures/proc/README.md): an
engine's under systemd (its unit's cgroup, v1 or v2), an engine's under the process back-end (its session,
also after the engine exited), anyone else's; and the node record's figures built from that."""

from __future__ import annotations

from pathlib import Path

from nebula.adapters.nvml import GpuReading, ProcessMemory
from nebula.adapters.procinfo import read_process
from nebula.core.gpu_usage import GpuProcess, engine_of, link_groups, moved, split_usage
from nebula.core.model import Gpu, NodeRecord
from nebula.services.agent.gpus import EngineView, GpuSampler, gpu_record, gpu_records

PROC = Path(__file__).resolve().parents[1] / "fixtures/proc"
GIB = 1024
SESSIONS = {5000: "embed"}


def proc(pid: int, used_mib: int = 0) -> GpuProcess:
    return read_process(pid, used_mib, PROC)


def test_proc_fixtures_read_as_cgroup_and_session() -> None:
    assert proc(5100).session == 5000  # the command name holds spaces and parentheses
    assert proc(4300).cgroup.startswith("12:memory:/system.slice/")
    gone = proc(99999, 10)
    assert gone == GpuProcess(99999, 10, "", None)


def test_engines_are_known_by_their_unit_cgroup_or_their_session() -> None:
    assert engine_of(proc(4242), SESSIONS) == "qwen:1"  # cgroup v2
    assert engine_of(proc(4300), SESSIONS) == "llama"  # cgroup v1, a tensor-parallel worker
    assert engine_of(proc(5100), SESSIONS) == "embed"  # process back-end: the engine's session
    assert engine_of(proc(5200), SESSIONS) == "embed"  # left behind by its engine, still in its session
    assert engine_of(proc(6000), SESSIONS) is None
    assert engine_of(proc(5100), {}) is None
    assert engine_of(proc(99999), SESSIONS) is None  # gone or hidden: not ours


def test_usage_splits_nebula_from_outside_and_counts_the_unlisted_as_outside() -> None:
    procs = [proc(4242, 30 * GIB), proc(4300, 20 * GIB), proc(6000, 10 * GIB)]
    u = split_usage(0, 80 * GIB, 61 * GIB, procs, SESSIONS)
    assert u.by_engine == {"qwen:1": 30 * GIB, "llama": 20 * GIB}
    assert (u.nebula_mib, u.others_mib, u.unlisted_mib) == (50 * GIB, 10 * GIB, GIB)
    assert u.outside_mib() == 11 * GIB  # the notebook and the driver's own
    # Given the engines that run, what a stopped one's processes still hold cannot be placed on either.
    assert u.outside_mib(running={"qwen:1"}) == 31 * GIB


def test_without_a_process_list_what_placements_did_not_declare_is_outside() -> None:
    u = split_usage(0, 80 * GIB, 50 * GIB, None, SESSIONS)
    assert not u.processes_known
    assert u.outside_mib(declared_mib=40 * GIB) == 10 * GIB
    assert u.outside_mib(declared_mib=60 * GIB) == 0


def test_link_groups_join_adjacent_gpus_transitively() -> None:
    assert link_groups(range(6), [(0, 1), (1, 2), (4, 5), (3, 9)]) == {0: 0, 1: 0, 2: 0, 3: 3, 4: 4, 5: 4}
    assert link_groups([0, 1], []) == {0: 0, 1: 1}


def test_figures_are_rewritten_only_when_they_moved_by_the_step() -> None:
    assert not moved({0: 1000, 1: 0}, {0: 1400, 1: 100}, 512)
    assert moved({0: 1000, 1: 0}, {0: 1600, 1: 0}, 512)
    assert moved({0: 0}, {0: 0, 1: 0}, 512)


def reading(index: int, used_gib: int, *procs: tuple[int, int]) -> GpuReading:
    return GpuReading(index=index, name="NVIDIA H200", memory_total_bytes=141 * 2**30,
                      memory_used_bytes=used_gib * 2**30, link_group=0,
                      processes=tuple(ProcessMemory(pid, gib * 2**30) for pid, gib in procs))


def test_sampler_attributes_through_the_agents_view_and_remembers_stopped_sessions() -> None:
    answers = [((reading(0, 71, (5100, 40), (6000, 30)),), "")]
    sampler = GpuSampler(lambda: answers[0], "n1", read_proc=lambda pid, mib: read_process(pid, mib, PROC))
    sampler.sample()
    assert sampler.outside_mib() == {0: 71 * GIB}  # before the agent's first pass, nothing is known as ours
    sampler.engines = EngineView(running=frozenset({"embed"}), sessions={5000: "embed"})
    sampler.sample()
    assert sampler.outside_mib() == {0: 31 * GIB}
    sampler.engines = EngineView()  # the engine is gone from the units; its worker (5100) is not
    sampler.sample()
    assert sampler.usage[0].by_engine == {"embed": 40 * GIB}
    answers[0] = ((reading(0, 31, (6000, 30)),), "")
    sampler.sample()  # the worker is gone too: the session is forgotten
    answers[0] = ((reading(0, 71, (5100, 40), (6000, 30)),), "")
    sampler.sample()
    assert sampler.usage[0].by_engine == {}


def test_a_draining_engine_holds_memory_placement_cannot_count_on_until_it_stops() -> None:
    """Its placement is gone (unloaded, or moved), so placement no longer counts its memory: it is outside use
    until the engine exits, or a new replica would be placed onto memory that is not free yet."""
    sampler = GpuSampler(lambda: ((reading(0, 71, (5100, 40), (6000, 30)),), ""), "n1",
                         read_proc=lambda pid, mib: read_process(pid, mib, PROC))
    sampler.engines = EngineView(running=frozenset({"embed"}), sessions={5000: "embed"}, placed=frozenset({"embed"}))
    sampler.sample()
    assert sampler.outside_mib() == {0: 31 * GIB}
    sampler.engines = EngineView(running=frozenset({"embed"}), sessions={5000: "embed"}, placed=frozenset())
    sampler.sample()
    assert sampler.outside_mib() == {0: 71 * GIB}
    assert sampler.usage[0].by_engine == {"embed": 40 * GIB}, "still Nebula's engine, for the release tracker"


def test_node_record_gpus_carry_outside_use_and_decode_old_records() -> None:
    g = gpu_record(reading(1, 70), 70 * GIB)
    assert g == Gpu(1, "NVIDIA H200", 141 * GIB, 70 * GIB, memory_outside_mib=70 * GIB, link_group=0)
    rec = NodeRecord(name="n", address="a", port_min=1, port_max=2, gpus=(g,))
    assert NodeRecord.from_dict(rec.to_dict()) == rec
    old = {"index": 0, "name": "A100", "memory_total_mib": 40960, "memory_used_mib": 0}
    assert Gpu.from_dict(old) == Gpu(0, "A100", 40960, 0)
    assert gpu_records((g,), (), {1: 70 * GIB + 100}, 512) is None
    updated = gpu_records((g,), (reading(1, 10),), {1: 9 * GIB}, 512)
    assert updated is not None and updated[0].memory_outside_mib == 9 * GIB and updated[0].memory_used_mib == 10 * GIB
