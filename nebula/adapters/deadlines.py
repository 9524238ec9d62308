"""Many deadlines behind one event-loop timer, for the engine client's per-request timeout (upstream_http.py).

A timer per request costs more than the request's other bookkeeping together on uvloop: call_at and cancel
start and stop a libuv timer and allocate a handle, where almost every request ends long before its deadline
and cancels it. Here a request's deadline is one dict entry, set and dropped, and one timer stays armed at the
earliest deadline known when it was set. Since the deadlines of a steady stream of requests only grow, a new
one rarely comes before the armed time, and the timer fires about once per timeout: it expires what is due,
and is set again at the earliest deadline left (a scan of the requests in flight). A deadline still expires
at its time, not at some sweep interval after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Final, Protocol

# A timer may fire up to this much before its time (libuv's timers count milliseconds): what is due by then
# counts as due, or an early firing would be set again for the same deadline, and again.
TIMER_SLACK_S: Final = 0.001


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class TimerLoop(Protocol):
    """What of an event loop the deadlines use."""

    def time(self) -> float: ...
    def call_at(self, when: float, callback: Callable[[], object], /) -> TimerHandle: ...


class Deadlines:
    """Deadlines by key, each with what to call when it passes; one timer on `loop` for all of them."""

    __slots__ = ("_armed_at", "_due", "_loop", "_timer")

    def __init__(self, loop: TimerLoop) -> None:
        self._loop = loop
        self._due: dict[Hashable, tuple[float, Callable[[], object]]] = {}
        self._timer: TimerHandle | None = None
        self._armed_at = math.inf

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: Hashable, at: float, expire: Callable[[], object]) -> None:
        """Call `expire` at loop time `at`, unless `key` is dropped before."""
        self._due[key] = (at, expire)
        if at < self._armed_at:
            self._arm(at)

    def drop(self, key: Hashable) -> None:
        """Forget `key`'s deadline (done in time); the timer stays as it is and finds nothing due."""
        self._due.pop(key, None)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._armed_at = None, math.inf
        due_by = self._loop.time() + TIMER_SLACK_S
        overdue = [key for key, (at, _) in self._due.items() if at <= due_by]
        for key in overdue:
            entry = self._due.pop(key, None)
            if entry is not None:  # an earlier expiry in this round may have dropped it
                entry[1]()
        if self._due:
            self._arm(min(at for at, _ in self._due.values()))
