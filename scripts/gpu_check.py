#!/usr/bin/env python3
"""Nebula's GPU path on a real GPU machine, offline and without vLLM (scripts/gpu-check.sh runs it).

One line per check, PASS / FAIL / SKIP with its figures; exit 1 on any FAIL, 3 when NVML sees no GPU:
  nvml-inventory       every GPU NVML sees: total, used, used outside Nebula, processes, link group
  placement-declared   place() two replicas with a declared per-GPU need on what the GPUs really have
  placement-refused    a need no GPU can hold is pending, with the reason
  placement-estimated  two replicas of Qwen2.5-7B-Instruct sized by nebula.core.memory (SKIP without it)
  tensor-parallel      vllm_command's argv and environment: --tensor-parallel-size, CUDA_VISIBLE_DEVICES in
                       NVML's (PCI) order, --gpu-memory-utilization from the per-GPU need
  standin-start        both replicas started as the agent's process back-end does, as stand-in engines
                       (scripts/gpu_standin.py: torch allocating the replica's share of its pinned GPUs)
  standin-pinning      each stand-in saw exactly its pinned GPUs, the ones NVML numbers so (UUIDs)
  standin-memory       NVML shows the stand-ins' memory, attributed to Nebula through their sessions, and
                       the memory used outside Nebula unchanged
  memory-freed         after the stop, the memory is back (the release tracker has nothing waiting)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # the source tree, when nebula is not on the path

from nebula.adapters.nvml import MIB, GpuReader, GpuReading, NvmlReader
from nebula.adapters.processes import ProcessEngineUnits
from nebula.adapters.procinfo import read_process
from nebula.core.config import EngineConfig
from nebula.core.engine_spec import EngineSpec, gpu_memory_share, vllm_command
from nebula.core.gpu_release import ReleaseTracker
from nebula.core.gpu_usage import GpuProcess, GpuUsage, split_usage
from nebula.core.memory import estimate
from nebula.core.model import Gpu, ModelSpec, NodeRecord, Placement
from nebula.core.placement import gpu_capacity_mib, mib_text, place
from nebula.core.profile import ModelProfile
from nebula.services.agent.specfiles import SpecFiles

NODE = "gpu-check"
RESERVE_MIB = 1024
SLACK_MIB = 512
STANDIN = Path(__file__).resolve().parent / "gpu_standin.py"
# Qwen2.5-7B-Instruct as its config.json and model.safetensors.index.json say (public; no weights read).
QWEN25_7B = ModelProfile(architecture="Qwen2ForCausalLM", model_type="qwen2", task="generate", max_positions=32768,
                         dtype="bfloat16", param_count=7_615_616_512, weight_bytes=15_231_233_024, layers=28,
                         hidden_size=3584, kv_heads=4, head_dim=128)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failed: int = 0

    def add(self, name: str, ok: bool | None, text: str) -> bool:
        """ok None: SKIP (not a failure)."""
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.failed += ok is False
        self.lines.append(f"{verdict} {name}: {text}")
        print(self.lines[-1], flush=True)
        return bool(ok)


# --- pure parts (tests/unit/test_gpu_check.py) ---------------------------------------------------------

def usage_of(readings: Sequence[GpuReading], sessions: Mapping[int, str],
             read_proc: Callable[[int, int], GpuProcess] = read_process) -> dict[int, GpuUsage]:
    out = {}
    for g in readings:
        procs = None if g.processes is None else [read_proc(p.pid, p.used_bytes // MIB) for p in g.processes]
        out[g.index] = split_usage(g.index, g.memory_total_mib, g.memory_used_mib, procs, sessions)
    return out


def node_of(readings: Sequence[GpuReading], usage: Mapping[int, GpuUsage]) -> NodeRecord:
    """The node record an agent would register (nothing of Nebula's runs yet: all use is outside)."""
    gpus = tuple(Gpu(g.index, g.name, g.memory_total_mib, g.memory_used_mib,
                     memory_outside_mib=usage[g.index].outside_mib(), link_group=g.link_group) for g in readings)
    return NodeRecord(name=NODE, address="127.0.0.1", port_min=18000, port_max=18099, gpus=gpus)


def two_replica_need_mib(node: NodeRecord, reserve_mib: int) -> int:
    """A per-GPU need of which two fit on the roomiest GPU: 16 GiB, less on small or busy GPUs (256 MiB steps)."""
    room = max((gpu_capacity_mib(g, reserve_mib) for g in node.gpus), default=0)
    return min(16 * 1024, room // 4) // 256 * 256


def overcommitted(node: NodeRecord, placements: Mapping[str, Placement], reserve_mib: int) -> list[str]:
    held: dict[int, int] = {}
    for p in placements.values():
        for i in p.gpu_indices:
            held[i] = held.get(i, 0) + p.model.gpu_memory_mib
    return [f"GPU {g.index}: {mib_text(held[g.index])} placed on {mib_text(gpu_capacity_mib(g, reserve_mib))}"
            for g in node.gpus if held.get(g.index, 0) > gpu_capacity_mib(g, reserve_mib)]


def engine_spec(p: Placement, node: NodeRecord) -> EngineSpec:
    """The spec the agent writes for `p` (NodeAgent.desired)."""
    return EngineSpec(instance=p.instance, model=p.model.name, source=p.model.source, port=p.port,
                      gpu_indices=p.gpu_indices, tensor_parallel_size=p.model.tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_share(p.model.gpu_memory_mib, node.gpus, p.gpu_indices))


def argv_problems(spec: EngineSpec, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """What is wrong with a GPU engine's command for `spec` (empty: nothing)."""
    def flag(name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None

    problems = []
    pinned = ",".join(str(i) for i in spec.gpu_indices)
    if env.get("CUDA_VISIBLE_DEVICES") != pinned:
        problems.append(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r}, want {pinned!r}")
    if env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        problems.append(f"CUDA_DEVICE_ORDER={env.get('CUDA_DEVICE_ORDER')!r}, want 'PCI_BUS_ID' (NVML's numbering)")
    want_tp = str(spec.tensor_parallel) if spec.tensor_parallel > 1 else None
    if flag("--tensor-parallel-size") != want_tp:
        problems.append(f"--tensor-parallel-size {flag('--tensor-parallel-size')}, want {want_tp}")
    want_share = f"{spec.gpu_memory_utilization:.2f}" if spec.gpu_memory_utilization else None
    if flag("--gpu-memory-utilization") != want_share:
        problems.append(f"--gpu-memory-utilization {flag('--gpu-memory-utilization')}, want {want_share}")
    return problems


def estimated_need_mib(profile: ModelProfile, max_model_len: int) -> tuple[int, str]:
    """The per-GPU need nebula.core.memory estimates for one replica on one GPU, with its explanation."""
    est = estimate(profile, max_model_len, tensor_parallel=1, concurrency=1)
    return est.total_mib, est.explain()


def no_gpu_line(note: str) -> str:
    return f"no NVIDIA GPU visible (NVML: {note or 'no devices'})"


# --- the checks -------------------------------------------------------------------------------------------

def check_inventory(report: Report, readings: Sequence[GpuReading], usage: Mapping[int, GpuUsage]) -> None:
    parts = []
    for g in readings:
        u = usage[g.index]
        procs = "processes unknown" if g.processes is None else f"{len(g.processes)} process(es)"
        parts.append(f"GPU {g.index} {g.name} {mib_text(g.memory_total_mib)} total, {mib_text(g.memory_used_mib)} "
                     f"used, {mib_text(g.memory_total_mib - g.memory_used_mib)} free, {mib_text(u.outside_mib())} "
                     f"outside Nebula, {procs}, link group {g.link_group}")
    ok = all(0 < g.memory_used_mib <= g.memory_total_mib for g in readings)
    report.add("nvml-inventory", ok, f"{len(readings)} GPU(s): " + "; ".join(parts))


def check_two_replicas(report: Report, name: str, node: NodeRecord, need_mib: int, how: str
                       ) -> dict[str, Placement]:
    model = ModelSpec(name=name, source="/models/none", replicas=2, gpus_per_replica=1, gpu_memory_mib=need_mib)
    r = place({name: model}, {NODE: node}, {}, gpu_reserve_mib=RESERVE_MIB)
    again = place({name: model}, {NODE: node}, r.placements, gpu_reserve_mib=RESERVE_MIB)
    over = overcommitted(node, r.placements, RESERVE_MIB)
    where = ", ".join(f"{i} -> GPU {','.join(map(str, p.gpu_indices))} port {p.port}"
                      for i, p in sorted(r.placements.items()))
    ok = len(r.placements) == 2 and not r.pending and not over and again.placements == r.placements
    trouble = [f"pending: {v}" for v in r.pending.values()] + [f"over-committed {o}" for o in over]
    report.add(f"placement-{how}", ok, "; ".join([f"2 replicas needing {mib_text(need_mib)} per GPU: "
                                                 f"{where or 'none'}", *trouble]))
    return dict(r.placements) if ok else {}


def check_refused(report: Report, node: NodeRecord) -> None:
    too_big = max(gpu_capacity_mib(g, RESERVE_MIB) for g in node.gpus) + 1024
    model = ModelSpec(name="check-too-big", source="/models/none", gpus_per_replica=1, gpu_memory_mib=too_big)
    r = place({model.name: model}, {NODE: node}, {}, gpu_reserve_mib=RESERVE_MIB)
    reason = r.pending.get(model.name, "")
    report.add("placement-refused", not r.placements and "largest free is" in reason,
               f"{mib_text(too_big)} per GPU: {reason or 'placed (it should not fit)'}")


def check_tensor_parallel(report: Report, node: NodeRecord) -> None:
    problems: list[str] = []
    two = EngineSpec(instance="tp", model="tp", source="/models/none", port=18000, gpu_indices=(0, 1))
    argv, env = vllm_command(two, EngineConfig(), cpu=False)
    problems += [f"2 GPUs: {p}" for p in argv_problems(two, argv, env)]
    count = min(2, len(node.gpus))
    model = ModelSpec(name="check-tp", source="/models/none", gpus_per_replica=count, gpu_memory_mib=8192)
    placed = place({model.name: model}, {NODE: node}, {}, gpu_reserve_mib=RESERVE_MIB).placements
    shown = ""
    if "check-tp" not in placed:
        problems.append(f"{count} GPU(s) of 8 GiB: not placed")
    else:
        spec = engine_spec(placed["check-tp"], node)
        argv, env = vllm_command(spec, EngineConfig(), cpu=False)
        problems += [f"placed: {p}" for p in argv_problems(spec, argv, env)]
        flags = [f"{a} {argv[k + 1]}" for k, a in enumerate(argv[:-1])
                 if a in ("--tensor-parallel-size", "--gpu-memory-utilization")]
        shown = (f"; {count} GPU(s) placed on GPU {','.join(map(str, spec.gpu_indices))}: "
                 f"{' '.join(flags) or 'no tensor-parallel flag'} "
                 f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')}")
    report.add("tensor-parallel", not problems, "; ".join(problems) or f"2 pinned GPUs -> --tensor-parallel-size 2, "
               f"CUDA_DEVICE_ORDER=PCI_BUS_ID{shown}")


# --- stand-in engines, started and stopped as the agent's process back-end does ---------------------------

@dataclass
class Standins:
    run_dir: Path
    units: ProcessEngineUnits
    specs: dict[str, EngineSpec]

    @staticmethod
    def create(run_dir: Path, python: str, specs: Mapping[str, EngineSpec]) -> Standins:
        files = SpecFiles(str(run_dir))
        for spec in specs.values():
            files.write(spec)
        units = ProcessEngineUnits([python, str(STANDIN), str(run_dir)], run_dir, run_dir / "logs", dict(os.environ),
                                   stop_timeout_s=20)
        return Standins(run_dir, units, dict(specs))

    def worker(self, instance: str) -> dict[str, object] | None:
        path = self.run_dir / f"{instance}.worker.json"
        return json.loads(path.read_text()) if path.exists() else None

    def log_tail(self, instance: str) -> str:
        path = self.run_dir / "logs" / f"{instance}.log"
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:]) if path.exists() else ""

    async def start(self, timeout_s: float) -> str:
        """'' once every stand-in has allocated its share, else what went wrong."""
        for instance in self.specs:
            await self.units.start(instance)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.worker(i) for i in self.specs):
                return ""
            listed = await self.units.list()
            for i in self.specs:
                st = listed.get(i)
                if (st is None or st.state.value == "failed") and not self.worker(i):
                    return f"{i} exited ({st.result if st else 'gone'}): {self.log_tail(i)}"
            await asyncio.sleep(0.5)
        return f"not allocated after {timeout_s:.0f} s: " + "; ".join(self.log_tail(i) for i in self.specs)

    async def sessions(self) -> dict[int, str]:
        return {st.main_pid: i for i, st in (await self.units.list()).items() if st.main_pid}

    async def stop(self) -> None:
        for instance in self.specs:
            await self.units.stop(instance)
        for instance in self.specs:
            await self.units.wait_stopped(instance)


def check_pinning(report: Report, standins: Standins, readings: Sequence[GpuReading]) -> None:
    uuids = {g.index: g.uuid for g in readings}
    problems, seen = [], []
    for i, spec in sorted(standins.specs.items()):
        w = standins.worker(i) or {}
        want = [uuids.get(x, "?") for x in spec.gpu_indices]
        got = [str(d.get("uuid", "")) for d in _devices(w)]
        seen.append(f"{i}: CUDA_VISIBLE_DEVICES={w.get('visible')} -> {', '.join(got) or 'no device'}")
        if w.get("visible") != ",".join(map(str, spec.gpu_indices)) or w.get("order") != "PCI_BUS_ID":
            problems.append(f"{i} ran with CUDA_VISIBLE_DEVICES={w.get('visible')} CUDA_DEVICE_ORDER={w.get('order')}")
        elif got != want:
            problems.append(f"{i} saw {got}, NVML numbers its GPUs {spec.gpu_indices} as {want}")
    report.add("standin-pinning", not problems, "; ".join(problems or seen))


def check_memory(report: Report, standins: Standins, before: Mapping[int, GpuUsage],
                 readings: Sequence[GpuReading], now: Mapping[int, GpuUsage]) -> None:
    problems, parts = [], []
    listed = {p.pid for g in readings for p in g.processes or ()}
    workers = {i: standins.worker(i) or {} for i in sorted(standins.specs)}
    allocated = {i: sum(_int(d.get("allocated_bytes")) for d in _devices(w)) // MIB for i, w in workers.items()}
    if not any(w.get("pid") in listed for w in workers.values()):
        # NVML shows no stand-in pid: a container with its own PID namespace (NVML reports the host's pids)
        # or a board that lists no processes. Attribution cannot work there (nor would it for an agent run
        # so); the stand-ins' memory is then checked by the growth of the GPUs' use.
        grew = sum(u.used_mib - before[i].used_mib for i, u in now.items() if i in before)
        want = sum(allocated.values())
        report.add("standin-memory", grew >= want, f"NVML lists none of the stand-ins' pids ({len(listed)} "
                   f"process(es) listed: another PID namespace?), so by total use: it grew by {mib_text(grew)} "
                   f"for {mib_text(want)} allocated")
        return
    for i in workers:
        held = sum(u.by_engine.get(i, 0) for u in now.values())
        parts.append(f"{i} allocated {mib_text(allocated[i])}, NVML attributes {mib_text(held)} to it")
        if held < allocated[i]:
            problems.append(f"{i}: NVML attributes {mib_text(held)} to it, under the {mib_text(allocated[i])} "
                            "it took")
    for index, u in sorted(now.items()):
        moved = u.outside_mib() - before[index].outside_mib()
        parts.append(f"GPU {index} outside Nebula {mib_text(before[index].outside_mib())} -> "
                     f"{mib_text(u.outside_mib())}")
        if abs(moved) > SLACK_MIB:
            problems.append(f"GPU {index}: use outside Nebula moved by {moved} MiB while only stand-ins started")
    report.add("standin-memory", not problems, "; ".join(problems or parts))


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _devices(worker: Mapping[str, object]) -> list[dict[str, object]]:
    devices = worker.get("devices", [])
    return [d for d in devices if isinstance(d, dict)] if isinstance(devices, list) else []


async def check_freed(report: Report, standins: Standins, read: GpuReader, before: Mapping[int, GpuUsage],
                      timeout_s: float) -> None:
    tracker = ReleaseTracker(timeout_s=timeout_s, slack_mib=SLACK_MIB)
    sessions = await standins.sessions()
    tracker.observe(time.monotonic(), list(usage_of(read()[0], sessions).values()), set(standins.specs))
    t0 = time.monotonic()
    await standins.stop()
    stopped = time.monotonic() - t0
    now: dict[int, GpuUsage] = {}
    while True:
        now = usage_of(read()[0], sessions)
        tracker.observe(time.monotonic(), list(now.values()), set())
        back = all(u.used_mib <= before[i].used_mib + SLACK_MIB for i, u in now.items() if i in before)
        if (back and not tracker.waiting()) or time.monotonic() - t0 > timeout_s:
            break
        await asyncio.sleep(0.5)
    figures = "; ".join(f"GPU {i} used {mib_text(before[i].used_mib)} before, {mib_text(u.used_mib)} now"
                        for i, u in sorted(now.items()) if i in before)
    left = ", ".join(f"{r.instance} {mib_text(r.left_mib)} on GPU {r.gpu}" for r in tracker.waiting())
    report.add("memory-freed", back and not left, f"stopped in {stopped:.1f} s, memory back after "
               f"{time.monotonic() - t0:.1f} s: {figures}" + (f"; not back: {left}" if left else ""))


async def run_standins(report: Report, node: NodeRecord, placements: Mapping[str, Placement], read: GpuReader,
                       python: str, start_s: float, free_s: float, run_root: str | None = None) -> None:
    before = usage_of(read()[0], {})
    run_dir = Path(tempfile.mkdtemp(prefix="nebula-gpu-check-", dir=run_root))
    standins = Standins.create(run_dir, python, {i: engine_spec(p, node) for i, p in placements.items()})
    try:
        t0 = time.monotonic()
        trouble = await standins.start(start_s)
        shares = ", ".join(f"{i} --gpu-memory-utilization {s.gpu_memory_utilization:.2f} on GPU {s.gpu_indices}"
                           for i, s in sorted(standins.specs.items()))
        if not report.add("standin-start", not trouble, trouble or f"{shares}; allocated in "
                          f"{time.monotonic() - t0:.1f} s"):
            return
        readings = read()[0]
        check_pinning(report, standins, readings)
        check_memory(report, standins, before, readings, usage_of(readings, await standins.sessions()))
        await check_freed(report, standins, read, before, free_s)
    finally:
        await standins.stop()
        await standins.units.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None, read: GpuReader | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="the interpreter (with torch) of the stand-in engines")
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--free-timeout", type=float, default=90.0)
    ap.add_argument("--run-root", default=None, help="where the stand-ins' run directory is made (default: $TMPDIR)")
    args = ap.parse_args(argv)
    reader = read or NvmlReader()
    readings, note = reader()
    if not readings:
        print(no_gpu_line(note), flush=True)
        return 3
    report = Report()
    usage = usage_of(readings, {})
    check_inventory(report, readings, usage)
    node = node_of(readings, usage)
    need = two_replica_need_mib(node, RESERVE_MIB)
    placements = check_two_replicas(report, "check-declared", node, need, "declared")
    check_refused(report, node)
    estimated, how = estimated_need_mib(QWEN25_7B, 8192)
    print(f"     Qwen2.5-7B-Instruct, max_model_len 8192: {how}", flush=True)
    check_two_replicas(report, "check-estimated", node, estimated, "estimated")
    check_tensor_parallel(report, node)
    if placements:
        asyncio.run(run_standins(report, node, placements, reader, args.python, args.start_timeout,
                                 args.free_timeout, args.run_root))
    else:
        report.add("standin-start", False, "no placement to start")
    print(f"{'FAIL' if report.failed else 'PASS'}: {report.failed} check(s) failed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
