"""Whose memory is on a GPU: Nebula's engines, or anything else (pure).

NVML lists the processes using a GPU with their memory; a process is a Nebula engine's when its cgroup lies
under a `nebula-engine@<instance>.service` unit (systemd back-end: every process of the unit, vLLM's workers
included), or when it belongs to the session of an engine the process back-end started (each engine is a
session leader; its workers inherit the session). Everything else on a GPU, other processes and the driver's
own reservation alike, is used outside Nebula, and placement must not hand it out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from nebula.core.units import instance_of_unit


@dataclass(frozen=True)
class GpuProcess:
    """One process NVML lists on a GPU, and what /proc said about it."""

    pid: int
    used_mib: int
    cgroup: str = ""
    """/proc/<pid>/cgroup as read ('' when the process is gone or hidden)."""
    session: int | None = None
    """Field 6 of /proc/<pid>/stat (the session id); None when it could not be read."""


def engine_of(proc: GpuProcess, sessions: Mapping[int, str]) -> str | None:
    """The Nebula engine instance `proc` belongs to, or None when it is not an engine's.

    `sessions`: session id -> instance, for the engines of the process back-end.
    """
    for line in proc.cgroup.splitlines():
        path = line.split(":", 2)[-1]  # v2 "0::/path", v1 "4:memory:/path"
        for part in path.split("/"):
            instance = instance_of_unit(part)
            if instance is not None:
                return instance
    if proc.session is not None:
        return sessions.get(proc.session)
    return None


@dataclass(frozen=True)
class GpuUsage:
    """One GPU's memory, split by owner."""

    index: int
    total_mib: int
    used_mib: int
    by_engine: Mapping[str, int] = field(default_factory=dict)
    """MiB held by each Nebula engine instance's processes."""
    others_mib: int = 0
    """MiB held by listed processes that are not Nebula's."""
    processes_known: bool = True
    """False where NVML cannot list processes (some vGPU and MIG set-ups)."""

    @property
    def nebula_mib(self) -> int:
        return sum(self.by_engine.values())

    @property
    def unlisted_mib(self) -> int:
        """In use but held by no listed process: the driver's reservation, processes NVML does not show, and
        memory a process left behind."""
        return max(0, self.used_mib - self.nebula_mib - self.others_mib)

    def outside_mib(self, declared_mib: int = 0, running: Collection[str] | None = None) -> int:
        """Memory placement cannot count on: used outside Nebula, and, given `running` (the engines whose
        unit is up), what processes of stopped engines still hold (workers left behind: not placed, not
        free either). Without a process list, all that is used beyond what this node's placements declared
        on the GPU (`declared_mib`) is taken to be outside."""
        if not self.processes_known:
            return max(0, self.used_mib - declared_mib)
        ours = self.by_engine.values() if running is None else [m for i, m in self.by_engine.items() if i in running]
        return max(0, self.used_mib - sum(ours))


def split_usage(index: int, total_mib: int, used_mib: int, procs: Sequence[GpuProcess] | None,
                sessions: Mapping[int, str]) -> GpuUsage:
    """The usage of one GPU from NVML's figures and its processes (None: NVML could not list them)."""
    if procs is None:
        return GpuUsage(index, total_mib, used_mib, processes_known=False)
    by_engine: dict[str, int] = {}
    others = 0
    for p in procs:
        instance = engine_of(p, sessions)
        if instance is None:
            others += p.used_mib
        else:
            by_engine[instance] = by_engine.get(instance, 0) + p.used_mib
    return GpuUsage(index, total_mib, used_mib, by_engine, others)


def link_groups(indices: Sequence[int], adjacent: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Each GPU's link group: GPUs joined, directly or through others, by an `adjacent` pair (NVLink, or a
    PCIe switch between them) share one, named by its lowest index."""
    parent = {i: i for i in indices}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in adjacent:
        if a in parent and b in parent:
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)
    return {i: root(i) for i in indices}


def moved(reported: Mapping[int, int], now: Mapping[int, int], step_mib: int) -> bool:
    """Whether per-GPU figures moved enough since they were last reported to be worth reporting again."""
    if reported.keys() != now.keys():
        return True
    return any(abs(now[i] - reported[i]) >= max(1, step_mib) for i in now)
