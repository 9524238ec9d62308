"""Whether a stopped engine gave its GPU memory back (pure, on an injected clock).

When an engine stops (its unit is down), the memory its processes held on each GPU must come back within
a bound. It has not when processes of that engine still hold memory (vLLM workers that outlived their
engine: they keep their session or their unit's cgroup), or when the memory held by no listed process grew
by what the engine held (memory a process left behind in the driver). Either way the GPU looks full to
placement and the next engine there fails; the agent reports what is left once the bound has passed
(nebula_agent_gpu_memory_unreleased_bytes), and Prometheus alerts on it (NebulaGpuMemoryNotReleased).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from nebula.core.gpu_usage import GpuUsage


@dataclass(frozen=True)
class Release:
    """One stopped engine's memory on one GPU, expected back."""

    instance: str
    gpu: int
    held_mib: int
    """What the engine held on the GPU at its last reading while it ran."""
    unlisted_mib: int
    """The GPU's memory held by no listed process at that reading."""
    since: float
    """When the engine was first seen stopped."""
    left_mib: int = 0
    """What is still not back, at the latest reading."""


class ReleaseTracker:
    def __init__(self, timeout_s: float, slack_mib: int) -> None:
        self.timeout_s = timeout_s
        self.slack_mib = slack_mib
        self._held: dict[tuple[str, int], tuple[int, int]] = {}
        self._releases: dict[tuple[str, int], Release] = {}
        self._overdue: set[tuple[str, int]] = set()
        self.overdue_total = 0
        """Releases that passed the bound, ever (a counter: one that resolves later still counted)."""

    def observe(self, now: float, usage: Sequence[GpuUsage], running: Collection[str]) -> None:
        """One reading of the GPUs, with the instances whose engines run now (unit not down)."""
        gpus = {u.index: u for u in usage}
        for u in usage:
            for instance, mib in u.by_engine.items():
                key = (instance, u.index)
                if instance in running:
                    self._held[key] = (mib, u.unlisted_mib)
                elif key not in self._held and key not in self._releases:
                    # Memory of an engine that is not running and was never seen running (the agent restarted
                    # after the stop): it is already waiting to come back.
                    self._releases[key] = Release(instance, u.index, mib, u.unlisted_mib, now)
        for key, (mib, unlisted) in list(self._held.items()):
            if key[0] not in running:
                del self._held[key]
                self._releases.setdefault(key, Release(key[0], key[1], mib, unlisted, now))
        for key, r in list(self._releases.items()):
            gpu = gpus.get(r.gpu)
            # A restarted engine takes its memory anew, and a GPU that left the machine has nothing to give back.
            left = None if r.instance in running or gpu is None else self._left(r, gpu)
            if left is None or left <= self.slack_mib:
                del self._releases[key]
                self._overdue.discard(key)
                continue
            self._releases[key] = replace(r, left_mib=left)
            if now - r.since >= self.timeout_s and key not in self._overdue:
                self._overdue.add(key)
                self.overdue_total += 1

    @staticmethod
    def _left(r: Release, u: GpuUsage) -> int:
        still_held = u.by_engine.get(r.instance, 0)
        left_behind = min(r.held_mib, max(0, u.unlisted_mib - r.unlisted_mib))
        return still_held + left_behind

    def overdue(self) -> list[Release]:
        """Releases past the bound with memory still not back, by GPU then instance."""
        return sorted((self._releases[k] for k in self._overdue), key=lambda r: (r.gpu, r.instance))

    def unreleased_mib(self, gpus: Collection[int]) -> dict[int, int]:
        """Per GPU of `gpus`: MiB that stopped engines have not given back within the bound (0: none)."""
        out = dict.fromkeys(gpus, 0)
        for r in self.overdue():
            if r.gpu in out:
                out[r.gpu] += r.left_mib
        return out

    def waiting(self) -> list[Release]:
        """Every release not yet complete, overdue or not."""
        return sorted(self._releases.values(), key=lambda r: (r.gpu, r.instance))
