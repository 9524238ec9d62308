"""The gateway supervisor's decisions (workers.py), on a controllable clock: when a worker is ready, stuck,
restarted and with what backoff; and what a worker is told."""

from __future__ import annotations

from nebula.core.restarts import MAX_BACKOFF_S
from nebula.services.gateway.workers import (
    START_TIMEOUT_S,
    WorkerBook,
    parse_notification,
    worker_env,
)


def test_ready_once_every_worker_said_so() -> None:
    book = WorkerBook(2, watchdog_s=10)
    for i, w in enumerate(book.workers):
        book.started(w, 100 + i, now=0)
    assert not book.all_ready() and book.status() == "0/2 workers ready"
    book.notified(100, {"READY": "1", "STATUS": "gateway listening"}, now=1)
    assert not book.all_ready()
    assert book.notified(999, {"READY": "1"}, now=1) is None  # not a worker of ours
    book.notified(101, {"READY": "1"}, now=2)
    assert book.all_ready() and book.status() == "2/2 workers ready"


def test_a_worker_ready_then_silent_is_killed_once() -> None:
    book = WorkerBook(1, watchdog_s=10)
    (w,) = book.workers
    book.started(w, 100, now=0)
    book.notified(100, {"READY": "1"}, now=1)
    book.notified(100, {"WATCHDOG": "1"}, now=5)
    assert book.stuck(now=15) == []
    assert book.stuck(now=16) == [w]  # silent for more than a watchdog period
    assert book.stuck(now=17) == []  # killed already: once is enough until its exit is seen


def test_a_worker_never_ready_is_stuck_and_its_successor_gets_its_own_chance() -> None:
    book = WorkerBook(2, watchdog_s=10)
    slow, busy = book.workers
    book.started(slow, 100, now=0)
    book.started(busy, 101, now=0)
    book.notified(101, {"READY": "1"}, now=1)
    book.notified(101, {"WATCHDOG": "1"}, now=START_TIMEOUT_S - 5)
    assert book.stuck(now=START_TIMEOUT_S) == []
    assert book.stuck(now=START_TIMEOUT_S + 1) == [slow]
    assert book.stuck(now=START_TIMEOUT_S + 6) == [busy]
    book.exited(slow, now=START_TIMEOUT_S + 7)
    book.started(slow, 102, now=START_TIMEOUT_S + 8)
    assert book.stuck(now=2 * START_TIMEOUT_S + 8) == []
    assert book.stuck(now=2 * START_TIMEOUT_S + 9) == [slow]


def test_quick_deaths_back_off_and_a_stable_worker_restarts_at_once() -> None:
    book = WorkerBook(1, watchdog_s=10)
    (w,) = book.workers
    assert book.due_to_start(now=0) == [w]
    now, delays = 0.0, []
    for _ in range(8):
        book.started(w, 100, now)
        now += 2  # dies two seconds after each start
        book.exited(w, now)
        delays.append(w.backoff_s)
        assert book.due_to_start(now) == [] and book.due_to_start(now + w.backoff_s) == [w]
        now += w.backoff_s
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30] and MAX_BACKOFF_S == 30
    assert w.restarts == 8 and w.pid == 0 and not w.ready
    book.started(w, 100, now)
    book.exited(w, now + 3600)
    assert w.backoff_s == 0 and book.due_to_start(now + 3600) == [w]


def test_notifications_and_the_worker_environment() -> None:
    assert parse_notification(b"READY=1\nSTATUS=a=b\ngarbage") == {"READY": "1", "STATUS": "a=b"}
    env = worker_env({"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
                      "WATCHDOG_PID": "1"}, "@supervisor", 4.0)
    assert env == {"PATH": "/bin", "NOTIFY_SOCKET": "@supervisor", "WATCHDOG_USEC": "4000000"}
