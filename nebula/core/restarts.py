"""When to restart what crashed. Pure: the caller passes the time.

RestartBook: the agent restarting a crashed engine itself (back-ends without a service manager's Restart=).
Mirrors nebula-engine@.service: restart after a delay, at most `max_restarts` within `window_s`; past that the
instance stays failed until its spec changes or it is loaded again.

crash_backoff: the processes Nebula keeps running itself, forever (`nebula up`'s control plane, gateway
workers): a quick exit doubles the delay up to a ceiling; one after a stable run restarts at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window_s: float = 600.0
    delay_s: float = 5.0


@dataclass
class RestartBook:
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _total: dict[str, int] = field(default_factory=dict)

    def failed(self, instance: str, at: float) -> None:
        """Record one failure (call once per failure, e.g. when the exit is first seen)."""
        self._failures.setdefault(instance, []).append(at)

    def restarted(self, instance: str) -> None:
        """Record one restart made (a start after a failure): failures and restarts differ by the last
        failure, which the policy may answer with no restart."""
        self._total[instance] = self._total.get(instance, 0) + 1

    def restarts(self, instance: str) -> int:
        """Restarts made so far, for the instance's status."""
        return self._total.get(instance, 0)

    def may_restart(self, instance: str, now: float) -> bool:
        """True once the delay after the last failure has passed, while the window's budget lasts."""
        times = [t for t in self._failures.get(instance, []) if now - t < self.policy.window_s]
        self._failures[instance] = times
        if not times:
            return False
        return len(times) <= self.policy.max_restarts and now - times[-1] >= self.policy.delay_s

    def given_up(self, instance: str, now: float) -> bool:
        times = [t for t in self._failures.get(instance, []) if now - t < self.policy.window_s]
        return len(times) > self.policy.max_restarts

    def forget(self, instance: str) -> None:
        self._failures.pop(instance, None)
        self._total.pop(instance, None)


STABLE_S = 60.0  # a process that ran this long before exiting is restarted without delay
MAX_BACKOFF_S = 30.0


def crash_backoff(previous_s: float, ran_s: float, first_s: float) -> float:
    """The delay before restarting a process that exited after running `ran_s`, its last delay being
    `previous_s`: none after a stable run, else `first_s` doubling per quick exit up to MAX_BACKOFF_S."""
    if ran_s >= STABLE_S:
        return 0.0
    return min(MAX_BACKOFF_S, max(first_s, 2 * previous_s))
