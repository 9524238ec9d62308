"""nebula.adapters.timeouts.timeout: asyncio.timeout's contract with Python 3.12's rule, on the real event loop.

The case that matters is a deadline in a task that has already caught a cancellation (a stop's cleanup), where
Python 3.11.2's asyncio.timeout raises CancelledError instead of TimeoutError. The deadlines are a few hundredths
of a second and the bodies await futures that never complete, so each deadline is what ends its body."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nebula.adapters.timeouts import timeout


def _never_done() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def _this_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None
    return task


async def test_a_body_that_ends_in_time_keeps_its_result() -> None:
    deadline = timeout(1.0)
    async with deadline:
        result = await asyncio.sleep(0, "answer")
    assert result == "answer"
    assert not deadline.expired()


async def test_the_deadline_raises_timeout_error_and_takes_back_its_cancellation() -> None:
    before = _this_task().cancelling()
    deadline = timeout(0.01)
    with pytest.raises(TimeoutError):
        async with deadline:
            await _never_done()
    assert deadline.expired()
    assert _this_task().cancelling() == before


async def test_the_deadline_raises_timeout_error_in_a_task_stopping_after_its_cancellation() -> None:
    """Fails on Python 3.11.2's asyncio.timeout: CancelledError, and the cleanup's `except TimeoutError` never
    runs (an etcd call in a stopping task got no failover)."""
    outcome: list[str] = []

    async def stopping() -> None:
        try:
            await _never_done()
        except asyncio.CancelledError:
            try:
                async with timeout(0.02):
                    await _never_done()
            except TimeoutError:
                outcome.append("timed out")
            # The stop's own cancellation is still there for whatever checks it (runtime.cancel_all).
            outcome.append(f"cancelling={_this_task().cancelling()}")
            raise

    task = asyncio.create_task(stopping())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait([task], timeout=1)
    assert outcome == ["timed out", "cancelling=1"], f"the cleanup got {task!r}"
    assert task.cancelled()


async def test_a_cancellation_arriving_with_the_deadline_is_raised_not_turned_into_timeout_error() -> None:
    """The deadline fires, and someone else cancels the task before the body resumes: theirs wins."""
    deadline = timeout(0.01)

    async def body() -> None:
        task = _this_task()
        waited = _never_done()
        # Registered before the task awaits `waited`, so it runs first when the deadline cancels `waited`: the
        # outside cancel lands after the deadline's and before the task resumes (and reaches __aexit__).
        waited.add_done_callback(lambda _: task.cancel())
        async with deadline:
            await waited

    task = asyncio.create_task(body())
    await asyncio.wait([task], timeout=1)
    assert task.cancelled(), f"got {task!r}"
    assert deadline.expired()


async def test_a_cancellation_before_the_deadline_is_raised_and_the_deadline_not_expired() -> None:
    deadline = timeout(10)

    async def body() -> None:
        async with deadline:
            await _never_done()

    task = asyncio.create_task(body())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait([task], timeout=1)
    assert task.cancelled()
    assert not deadline.expired()


async def test_no_delay_never_expires() -> None:
    deadline = timeout(None)
    async with deadline:
        await asyncio.sleep(0.05)
    assert not deadline.expired()


@pytest.mark.parametrize("delay", [0, -1.0])
async def test_a_delay_already_past_expires_at_the_first_await(delay: float) -> None:
    deadline = timeout(delay)
    got_past_the_first_await = False
    with pytest.raises(TimeoutError):
        async with deadline:
            await asyncio.sleep(0)
            got_past_the_first_await = True
    assert deadline.expired()
    assert not got_past_the_first_await


async def test_an_inner_deadline_is_caught_inside_the_outer_which_goes_on() -> None:
    outer, inner = timeout(1.0), timeout(0.01)
    async with outer:
        with pytest.raises(TimeoutError):
            async with inner:
                await _never_done()
        result = await asyncio.sleep(0, "went on")
    assert result == "went on"
    assert inner.expired() and not outer.expired()


async def test_an_outer_deadline_passes_through_the_inner_one_as_cancelled_error() -> None:
    outer, inner = timeout(0.01), timeout(1.0)
    inner_raised: list[type[BaseException]] = []
    with pytest.raises(TimeoutError):
        async with outer:
            try:
                async with inner:
                    await _never_done()
            except BaseException as exc:
                inner_raised.append(type(exc))
                raise
    assert inner_raised == [asyncio.CancelledError]
    assert outer.expired() and not inner.expired()


def test_outside_a_task_it_is_refused() -> None:
    with pytest.raises(RuntimeError):
        timeout(1.0).__aenter__().send(None)


async def test_an_error_raised_after_the_deadline_passes_through_and_the_count_is_taken_back() -> None:
    """A body that turns the deadline's cancellation into an error of its own (a cleanup that fails)."""
    before = _this_task().cancelling()
    deadline = timeout(0.01)
    with pytest.raises(ValueError, match="cleanup failed"):
        async with deadline:
            try:
                await _never_done()
            except asyncio.CancelledError:
                raise ValueError("cleanup failed") from None
    assert deadline.expired()
    assert _this_task().cancelling() == before


async def test_a_body_that_swallows_the_deadline_ends_normally_and_leaves_no_cancellation_behind() -> None:
    before = _this_task().cancelling()
    deadline = timeout(0.01)
    async with deadline:
        try:
            await _never_done()
        except asyncio.CancelledError:
            pass
    assert deadline.expired()
    assert _this_task().cancelling() == before
    assert await asyncio.sleep(0.02, "still running") == "still running"  # no cancellation left to arrive


async def test_a_timeout_is_entered_once() -> None:
    deadline = timeout(1.0)
    async with deadline:
        pass
    with pytest.raises(RuntimeError):
        async with deadline:
            pass
