"""crash_backoff: the restart delay of the processes Nebula keeps itself (`nebula up`'s children, gateway workers)."""

from __future__ import annotations

from nebula.core.restarts import MAX_BACKOFF_S, STABLE_S, crash_backoff


def test_crash_backoff_doubles_for_quick_exits_and_resets_after_a_stable_run() -> None:
    delay, seen = 0.0, []
    for _ in range(8):
        delay = crash_backoff(delay, ran_s=2.0, first_s=0.5)
        seen.append(delay)
    assert seen == [0.5, 1, 2, 4, 8, 16, MAX_BACKOFF_S, MAX_BACKOFF_S]
    assert crash_backoff(MAX_BACKOFF_S, ran_s=STABLE_S, first_s=0.5) == 0.0
