"""Keeping a lease alive on any `Store`, and the backoff every retry loop shares.

Generic over the `Store` protocol, so services test it against `MemoryStore` and run it against
`EtcdStore` unchanged. Sleeping is injectable so unit tests never wait for real timers. (Mirroring a
prefix is `nebula.services.cluster.mirror.Mirror`, typed and self-healing.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

from nebula.core.store import KeyValue, LeaseLostError, Store
from nebula.errors import TemporaryError

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
OnChange = Callable[[dict[str, KeyValue]], Awaitable[None] | None]
OnNewLease = Callable[[int], Awaitable[None]]


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: float = 0.0) -> float:
    """Delay before retry number `attempt` (1-based): exponential from `base`, capped at `cap`.

    `jitter` in [0, 1) shaves up to that fraction off the delay so that many clients cut off together
    do not all come back in the same instant; callers pass `random.random() * f`, tests pass a constant.
    """
    if attempt <= 0:
        return 0.0
    # Bound the exponent so huge attempt counts cannot overflow the float.
    delay = min(cap, base * 2.0 ** min(attempt - 1, 32))
    return delay * (1.0 - min(max(jitter, 0.0), 0.999))


class LeaseKeeper:
    """Holds one lease of `ttl` seconds for a service, re-granting it when it is lost.

    Usage: `lease = await keeper.start()`, write your keys with it, then run `keeper.run()` as a task.
    When the lease expires (the process was cut off longer than the TTL) a new one is granted and
    `on_new_lease(lease)` is awaited so the owner re-writes its keys; if that callback raises a
    TemporaryError it is called again on the next tick.
    """

    def __init__(
        self,
        store: Store,
        ttl: int,
        on_new_lease: OnNewLease,
        *,
        retry_delay: float = 0.2,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self._store = store
        self._ttl = ttl
        self._on_new_lease = on_new_lease
        self._retry_delay = retry_delay
        self._sleep = sleep
        self._lease = 0
        self._callback_pending = False
        self._failures = 0

    @property
    def lease(self) -> int:
        """The current lease id; 0 before start() and while a lost lease could not be replaced yet."""
        return self._lease

    @property
    def interval(self) -> float:
        """Seconds between keepalives: a third of the TTL leaves two retries before expiry."""
        return self._ttl / 3

    async def start(self) -> int:
        """Grant the first lease (no callback: the caller writes its keys with the returned id)."""
        self._lease = await self._store.grant_lease(self._ttl)
        return self._lease

    async def tick(self) -> float:
        """One keepalive round; returns how long to wait before the next one."""
        try:
            await self._step()
        except TemporaryError as exc:
            self._failures += 1
            delay = min(self.interval, backoff_delay(self._failures, base=self._retry_delay, cap=self._ttl))
            log.warning("lease %x keepalive failed (%r); retrying in %.2fs", self._lease, exc, delay)
            return delay
        self._failures = 0
        return self.interval

    async def _step(self) -> None:
        if self._lease and not self._callback_pending:
            try:
                await self._store.keepalive(self._lease)
                return
            except LeaseLostError:
                log.warning("lease %x lost; granting a new one", self._lease)
                self._lease = 0
        if not self._lease:
            self._lease = await self._store.grant_lease(self._ttl)
            self._callback_pending = True
        await self._on_new_lease(self._lease)
        self._callback_pending = False

    async def run(self) -> NoReturn:
        """Keep the lease alive until cancelled (grants one first if start() was not called)."""
        while True:
            await self._sleep(await self.tick())

    async def revoke(self) -> None:
        """Give the lease back so the owner's keys vanish at once (clean shutdown)."""
        lease, self._lease = self._lease, 0
        if lease:
            await self._store.revoke_lease(lease)
