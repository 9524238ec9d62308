"""One deadline for awaits in nebula/: `async with timeout(seconds):`, asyncio.timeout's contract, 3.12's rules.

asyncio.wait_for is banned here: on Python 3.11 it returns the awaited call's result (or raises its error) when the
call ends in the turn its caller is cancelled, and the cancellation is gone (gh-86296; a lease keepalive loop that
lost its SIGTERM never stopped). asyncio.timeout keeps the cancellation, but up to Python 3.11.2 (Debian 12's) it
turns its deadline into TimeoutError only when `task.uncancel() == 0` afterwards (gh-102780). In a task that has
already caught a cancellation and goes on with its cleanup (a `finally:` after SIGTERM's cancel, `task.cancelling()
== 1`), the deadline raises CancelledError instead: the caller's `except TimeoutError` never runs (an etcd call in
a stopping task gets no failover, a shutdown wait never reaches its timeout branch). Python 3.12 (and 3.11.3)
record the task's `cancelling()` count on entry and raise TimeoutError when `uncancel()` comes back to it;
`timeout` is 3.12's asyncio.timeout there and the same rule here on 3.11, so one deadline works in normal code and
in a stop's cleanup. One difference, moot as every use is `async with timeout(x):`: the delay counts from entering
the block, where asyncio's counts from the timeout() call.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 12):
    # The standard library's is right from 3.12 on; ruff bans it elsewhere in nebula/ for 3.11's sake.
    from asyncio import timeout as timeout  # noqa: TID251
else:
    import asyncio
    from types import TracebackType
    from typing import Self

    class Timeout:
        """A deadline on the body of an `async with` in the current task (made by `timeout`)."""

        def __init__(self, delay: float | None) -> None:
            self._delay = delay
            self._task: asyncio.Task[object] | None = None
            # The task's cancellations already requested on entry: the deadline's own comes on top of these.
            self._cancelling_on_entry = 0
            self._timer: asyncio.Handle | None = None
            self._expired = False

        def expired(self) -> bool:
            """Did the deadline pass (and cancel the body)?"""
            return self._expired

        def __repr__(self) -> str:
            return f"<Timeout delay={self._delay} expired={self._expired}>"

        async def __aenter__(self) -> Self:
            if self._task is not None:
                raise RuntimeError("a timeout is entered once")
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("timeout() should be used inside a task")
            self._task = task
            self._cancelling_on_entry = task.cancelling()
            loop = asyncio.get_running_loop()
            if self._delay is not None and self._delay <= 0:
                # Already past, as asyncio's: due before the body's first await resumes (call_later would queue it
                # behind that resumption, and the body would get past an `await asyncio.sleep(0)`).
                self._timer = loop.call_soon(self._expire)
            elif self._delay is not None:
                self._timer = loop.call_later(self._delay, self._expire)
            return self

        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._expired:
                return
            assert self._task is not None
            # Back at the entry's count: no cancellation but the deadline's arrived, so the CancelledError is ours.
            # Above it: someone else cancelled the task too, and their cancellation goes on as CancelledError.
            if (self._task.uncancel() <= self._cancelling_on_entry and exc_type is not None
                    and issubclass(exc_type, asyncio.CancelledError)):
                raise TimeoutError from exc

        def _expire(self) -> None:
            assert self._task is not None
            self._timer = None
            self._expired = True
            self._task.cancel()

    def timeout(delay: float | None) -> Timeout:
        """Cancel the body of `async with timeout(delay):` after `delay` seconds (None: never) and raise
        TimeoutError in its place; a cancellation from elsewhere still raises CancelledError."""
        return Timeout(delay)
