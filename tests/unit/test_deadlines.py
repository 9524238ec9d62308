"""Many deadlines on one timer (adapters/deadlines.py), on a loop whose clock and timers the test drives."""

from __future__ import annotations

import functools
from collections.abc import Callable

from nebula.adapters.deadlines import TIMER_SLACK_S, Deadlines


class _Timer:
    def __init__(self, at: float, callback: Callable[[], object]) -> None:
        self.at, self.callback, self.cancelled = at, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class _Loop:
    """A clock that moves only when told, and the timers set on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[_Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object], /) -> _Timer:
        timer = _Timer(when, callback)
        self.timers.append(timer)
        return timer

    def armed(self) -> list[float]:
        return [t.at for t in self.timers if not t.cancelled]

    def advance(self, to: float) -> None:
        """Move the clock to `to`, firing the timers due by then in order (as the loop would)."""
        while True:
            due = sorted((t for t in self.timers if not t.cancelled and t.at <= to), key=lambda t: t.at)
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = max(self.now, timer.at)
            timer.callback()
        self.now = to


def test_one_timer_serves_a_stream_of_growing_deadlines() -> None:
    loop, expired = _Loop(), list[int]()
    deadlines = Deadlines(loop)
    for i in range(1000):
        deadlines.set(i, loop.now + 60, functools.partial(expired.append, i))
        loop.now += 0.01
        deadlines.drop(i)  # done in time
    assert len(loop.timers) == 1 and loop.armed() == [160.0]
    loop.advance(200.0)
    assert expired == [] and len(deadlines) == 0
    assert loop.armed() == [], "nothing left: the timer is not set again"


def test_a_deadline_expires_at_its_time_not_later() -> None:
    loop, expired = _Loop(), []
    deadlines = Deadlines(loop)
    deadlines.set("a", 110.0, lambda: expired.append(("a", loop.now)))
    deadlines.set("b", 130.0, lambda: expired.append(("b", loop.now)))
    loop.advance(120.0)
    assert expired == [("a", 110.0)]
    assert loop.armed() == [130.0], "set again at the earliest deadline left"
    loop.advance(140.0)
    assert expired == [("a", 110.0), ("b", 130.0)]


def test_an_earlier_deadline_sets_the_timer_earlier() -> None:
    loop, expired = _Loop(), []
    deadlines = Deadlines(loop)
    deadlines.set("long", 700.0, lambda: expired.append("long"))
    deadlines.set("short", 105.0, lambda: expired.append("short"))
    assert loop.armed() == [105.0]
    loop.advance(106.0)
    assert expired == ["short"] and loop.armed() == [700.0]


def test_a_timer_that_fires_a_little_early_still_expires_what_is_due() -> None:
    loop, expired = _Loop(), []
    deadlines = Deadlines(loop)
    deadlines.set("a", 110.0, lambda: expired.append("a"))
    [timer] = loop.timers
    loop.now = 110.0 - TIMER_SLACK_S / 2  # libuv counts milliseconds: it may run the timer this early
    loop.timers.remove(timer)
    timer.callback()
    assert expired == ["a"] and loop.armed() == []


def test_an_expiry_that_drops_another_deadline_is_not_followed_by_that_ones() -> None:
    loop, expired = _Loop(), []
    deadlines = Deadlines(loop)

    def expire_a() -> None:
        expired.append("a")
        deadlines.drop("b")

    deadlines.set("a", 110.0, expire_a)
    deadlines.set("b", 110.0, lambda: expired.append("b"))
    loop.advance(111.0)
    assert expired == ["a"]


def test_a_dropped_deadline_never_expires() -> None:
    loop, expired = _Loop(), []
    deadlines = Deadlines(loop)
    deadlines.set("a", 110.0, lambda: expired.append("a"))
    deadlines.drop("a")
    deadlines.drop("a")  # twice is harmless (released after completing)
    loop.advance(500.0)
    assert expired == []
