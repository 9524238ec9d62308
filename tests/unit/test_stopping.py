"""A service stops on SIGTERM even when one of its tasks loses its cancellation.

Python 3.11's asyncio.wait_for returns the awaited call's result (or raises its error) when the call ends in
the same turn of the loop as the cancellation of the task awaiting it (gh-86296): the cancellation is gone. A
node agent whose lease keepalive lost it this way kept its lease and never exited (the chaos suite's rolling
restart then waited 30 s for it and failed). The etcd client awaits its RPCs under
nebula.adapters.timeouts.timeout, in the caller's own task, where no cancellation is dropped
(EtcdConnection.call), and a stopping service cancels a task again until it ends (runtime.cancel_all), for
whatever else might still drop one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from aetcd import rpc

from nebula.adapters import etcd_connection
from nebula.adapters.etcd_connection import Client, Conn, EtcdConnection
from nebula.core.store import StoreUnavailableError
from nebula.services.runtime import cancel_all, run_tasks_until


class _Connected(EtcdConnection):
    """A connection whose channel is already open; the RPCs are the test's."""

    async def current(self) -> Conn:
        return Conn(client=Client(None, None, None, None, None), generation=0, endpoint="127.0.0.1:2379")


async def _call_cancelled_as_it_ends(end_rpc: Callable[[asyncio.Future[Any]], None]) -> asyncio.Task[Any]:
    """The task of an etcd call whose caller is cancelled in the very turn its RPC ends (`end_rpc` sets the
    RPC's outcome): gRPC's reply and a SIGTERM arriving in the same pass of the loop."""
    etcd = _Connected(["http://127.0.0.1:2379"], timeout=5.0, security=None)
    caller: asyncio.Task[Any] | None = None

    async def rpc_call(client: Any) -> Any:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def reply_and_sigterm() -> None:
            assert caller is not None
            end_rpc(reply)
            caller.cancel()

        asyncio.get_running_loop().call_soon(reply_and_sigterm)
        return await reply

    caller = asyncio.create_task(etcd.call(rpc_call))
    await asyncio.wait([caller])
    return caller


async def test_a_call_cancelled_as_it_answers_raises_the_cancellation() -> None:
    caller = await _call_cancelled_as_it_ends(lambda reply: reply.set_result("answer"))
    assert caller.cancelled(), f"the cancellation was dropped: the call returned {caller.result()!r}"


async def test_a_call_cancelled_as_it_fails_raises_the_cancellation_not_a_retryable_error() -> None:
    unavailable = grpc.aio.AioRpcError(rpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    caller = await _call_cancelled_as_it_ends(lambda reply: reply.set_exception(unavailable))
    # A StoreUnavailableError here would be retried by a keepalive loop, which would then never end.
    assert caller.cancelled(), f"got {caller.exception()!r}"


async def _last_call_of_a_stopping_task(etcd: EtcdConnection, op: Callable[[Any], Awaitable[Any]]
                                        ) -> asyncio.Task[Any]:
    """The task of a service that makes one more store call in its `finally` after SIGTERM's cancellation,
    once it has ended."""
    async def stopping() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await etcd.call(op)

    task = asyncio.create_task(stopping())
    await asyncio.sleep(0)
    task.cancel()  # SIGTERM
    await asyncio.wait([task], timeout=5)
    assert task.done(), "the call never ended"
    return task


async def test_a_call_in_a_stopping_task_whose_rpc_never_answers_fails_at_its_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its deadline is a StoreUnavailableError (and a failover), where Python 3.11.2's asyncio.timeout raised
    CancelledError there."""
    monkeypatch.setattr(etcd_connection, "_GUARD_MARGIN_S", 0.0)

    async def never_answers(client: Any) -> Any:
        return await asyncio.get_running_loop().create_future()

    task = await _last_call_of_a_stopping_task(
        _Connected(["http://127.0.0.1:2379"], timeout=0.05, security=None), never_answers)
    assert not task.cancelled(), f"got {task!r}"
    assert isinstance(task.exception(), StoreUnavailableError)


async def test_a_channel_closed_under_a_call_in_a_stopping_task_is_a_connection_loss() -> None:
    """gRPC raises CancelledError in the caller of every RPC on a channel that a failover closes. In a task
    that has already caught SIGTERM's cancellation that is still a lost connection (StoreUnavailableError),
    not a second cancellation: only one that arrives during the call is."""
    async def channel_closed(client: Any) -> Any:
        raise asyncio.CancelledError  # what grpc.aio raises when the channel is closed under the RPC

    task = await _last_call_of_a_stopping_task(
        _Connected(["http://127.0.0.1:2379"], timeout=5.0, security=None), channel_closed)
    assert not task.cancelled(), f"got {task!r}"
    assert isinstance(task.exception(), StoreUnavailableError)


async def _loses_its_first_cancellation(lost: asyncio.Event) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        lost.set()  # what a call whose cancellation wait_for dropped does: it goes on
    await asyncio.Event().wait()


async def test_a_task_that_loses_its_cancellation_is_cancelled_again_and_named(
        caplog: pytest.LogCaptureFixture) -> None:
    lost = asyncio.Event()
    stubborn = asyncio.create_task(_loses_its_first_cancellation(lost), name="lease")
    polite = asyncio.create_task(asyncio.Event().wait(), name="http")
    await asyncio.sleep(0)  # both are waiting
    with caplog.at_level(logging.WARNING, logger="nebula.runtime"):
        await asyncio.wait_for(cancel_all([stubborn, polite], recancel_s=0.01), 10)
    assert lost.is_set() and stubborn.cancelled() and polite.cancelled()
    assert "cancelling again: lease" in caplog.text
    assert "http" not in caplog.text


async def test_a_service_stops_although_one_of_its_tasks_lost_a_cancellation() -> None:
    stop, lost = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(_loses_its_first_cancellation(lost), name="lease")]
    stop.set()  # SIGTERM
    await asyncio.wait_for(run_tasks_until(stop, tasks, recancel_s=0.01), 10)
    assert lost.is_set() and tasks[0].cancelled()


async def test_a_task_finishing_its_stop_is_left_to_finish(caplog: pytest.LogCaptureFixture) -> None:
    """A stop that takes its time (the gateway finishing the answers in flight) is not cut short."""
    release, finished = asyncio.Event(), asyncio.Event()

    async def draining() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # the answers in flight end
            finished.set()

    task = asyncio.create_task(draining(), name="http")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="nebula.runtime"):
        stopping = asyncio.create_task(cancel_all([task]))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not stopping.done()
        release.set()
        await asyncio.wait_for(stopping, 10)
    assert finished.is_set() and task.cancelled()
    assert "cancelling again" not in caplog.text
