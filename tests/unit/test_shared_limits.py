"""Per-key limits counted across a gateway's workers (adapters/shared_limits.py): limiters of several workers over
one shared table, in this process and in real processes racing for it, a worker's death (its requests leave the
counts; a death while holding the lock leaves the lock usable), and what happens when a key cannot be shared."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nebula.adapters.shared_limits import FD_ENV, SharedLimiter, SharedTable, worker_limiter
from nebula.core.apikeys import KeyLimits

ROOT = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def workers(n: int, clock: Clock) -> tuple[SharedTable, list[SharedLimiter]]:
    table = SharedTable.create(n, slots=64)
    # Each worker maps the table itself, as a worker process does from the descriptor it inherits.
    return table, [SharedLimiter(SharedTable(table.fd), i, clock) for i in range(n)]


def test_a_minutes_allowance_is_shared_by_every_worker_and_refills_for_all() -> None:
    clock = Clock()
    _, (a, b, c) = workers(3, clock)
    limits = KeyLimits(requests_per_minute=10)
    taken = [w.admit(KEY, limits) for w in (a, b, c) * 4]
    assert [t is None for t in taken] == [True] * 10 + [False] * 2
    refused = taken[-1]
    assert refused is not None and refused.reason == "rate" and refused.retry_after_s == 6
    assert "limit of 10 requests per minute is used up" in refused.message
    clock.now += 6.0  # one token back (10 a minute), for whichever worker asks first
    assert b.admit(KEY, limits) is None and a.admit(KEY, limits) is not None
    clock.now += 60.0
    assert sum(w.admit(KEY, limits) is None for w in (c, a, b) * 5) == 10, "a full bucket, never more"
    assert a.admit(KEY, KeyLimits(requests_per_minute=20)) is None, "new limits start a new, full bucket"


def test_requests_in_flight_count_across_workers_and_a_dead_workers_leave_the_count() -> None:
    clock = Clock()
    table, (a, b) = workers(2, clock)
    limits = KeyLimits(max_concurrent=3)
    assert a.admit(KEY, limits) is None and b.admit(KEY, limits) is None and b.admit(KEY, limits) is None
    refused = a.admit(KEY, limits)
    assert refused is not None and refused.reason == "concurrency"
    assert "already has 3 requests in flight" in refused.message
    assert a.inflight(KEY) == b.inflight(KEY) == 3
    a.release(KEY)
    assert b.admit(KEY, limits) is None  # the slot worker a gave back
    table.clear_worker(1)  # worker b died with its 3 requests: they are over
    assert a.inflight(KEY) == 0
    b.release(KEY)  # a release that its worker's death already counted changes nothing
    assert a.inflight(KEY) == 0
    assert all(w.admit(KEY, limits) is None for w in (a, a, b)) and a.admit(KEY, limits) is not None


def test_worker_processes_racing_for_one_key_get_exactly_its_limits() -> None:
    table = SharedTable.create(4, slots=64)
    racer = textwrap.dedent(f"""
        import sys
        from nebula.adapters.shared_limits import SharedLimiter, SharedTable
        from nebula.core.apikeys import KeyLimits
        fd, worker = int(sys.argv[1]), int(sys.argv[2])
        limiter = SharedLimiter(SharedTable(fd), worker, lambda: 1000.0)  # a still clock: no refill mid-race
        both = KeyLimits(requests_per_minute=150, max_concurrent=1000)
        inflight = KeyLimits(max_concurrent=90)
        rate = sum(limiter.admit("{KEY}", both) is None for _ in range(200))
        held = sum(limiter.admit("fedcba9876543210", inflight) is None for _ in range(200))
        print(rate, held)
        """)
    procs = [subprocess.Popen([sys.executable, "-c", racer, str(table.fd), str(i)], pass_fds=(table.fd,),
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for i in range(4)]
    got = [tuple(int(x) for x in p.communicate(timeout=60)[0].split()) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(r for r, _ in got) == 150, got
    assert sum(h for _, h in got) == 90, got


def test_a_worker_killed_holding_the_lock_leaves_it_usable() -> None:
    table = SharedTable.create(2, slots=64)
    # The table stays mapped until the process dies, as in a worker: the kernel frees a dead owner's robust
    # mutex only where the memory is still mapped at exit.
    dies_locked = "import os, sys\nfrom nebula.adapters.shared_limits import SharedTable\n" \
                  "table = SharedTable(int(sys.argv[1]))\ntable.lock()\nos._exit(9)\n"
    proc = subprocess.run([sys.executable, "-c", dies_locked, str(table.fd)], pass_fds=(table.fd,), check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 9
    limiter = SharedLimiter(table, 0, Clock())
    assert limiter.admit(KEY, KeyLimits(max_concurrent=1)) is None  # the lock came back (EOWNERDEAD), usable
    assert limiter.admit(KEY, KeyLimits(max_concurrent=1)) is not None


def test_keys_the_table_cannot_hold_are_counted_per_worker_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    table = SharedTable.create(2, slots=2)
    a, b = SharedLimiter(table, 0, Clock()), SharedLimiter(table, 1, Clock())
    limits = KeyLimits(max_concurrent=1)
    with caplog.at_level(logging.WARNING, "nebula.adapters.shared_limits"):
        for key in ("a" * 16, "b" * 16):
            assert a.admit(key, limits) is None and b.admit(key, limits) is not None  # shared: 2 slots
        third = "c" * 16
        assert a.admit(third, limits) is None and b.admit(third, limits) is None, "full: each worker its own"
        assert a.admit("x" * 40, limits) is None and b.admit("x" * 40, limits) is None, "an id too long for a slot"
    assert len([r for r in caplog.records if "counted per worker" in r.message]) == 2  # once per worker
    a.release(third)
    assert a.inflight(third) == 0 and b.inflight(third) == 1


def test_a_worker_takes_its_table_from_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    table = SharedTable.create(2, slots=8)
    env = {FD_ENV: str(table.fd), "OTHER": "x"}
    limiter = worker_limiter(env, 1, Clock())
    assert isinstance(limiter, SharedLimiter) and env == {"OTHER": "x"}, "taken out: nothing it starts inherits it"
    assert worker_limiter({FD_ENV: str(table.fd)}, None, Clock()) is None, "a gateway on its own counts alone"
    with open(os.devnull, "rb") as not_a_table, caplog.at_level(logging.WARNING):
        assert worker_limiter({FD_ENV: str(not_a_table.fileno())}, 0, Clock()) is None
    assert "counted per worker: the shared table is unusable" in caplog.text
    with pytest.raises(ValueError, match="worker 2 is not one of the table's 2"):
        SharedLimiter(table, 2, Clock())
