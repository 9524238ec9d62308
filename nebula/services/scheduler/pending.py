"""Why models are pending, where operators see it: `/nebula/status/models/<name>`, under the leader's lease.

Only the leader writes them; they vanish with its lease, and a new leader first deletes the ones it does not
confirm, so a reason never outlives the condition by more than one pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from nebula.core import keys
from nebula.core.status import ModelStatus
from nebula.core.store import Store
from nebula.services.cluster.writes import ClusterWrites, Fence


class PendingReporter:
    def __init__(self, store: Store, writes: ClusterWrites, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.writes = writes
        self.clock = clock
        self._written: dict[str, ModelStatus] | None = None

    def reset(self) -> None:
        """Leadership (re)gained: what is in the store is someone else's; check it all on the next sync."""
        self._written = None

    async def sync(self, pending: Mapping[str, str], fence: Fence) -> bool:
        """Bring the reasons in the store in line with `pending`; False once the fence has fallen."""
        if self._written is None:
            snap = await self.store.list_prefix(keys.MODEL_STATUS)
            stale = [kv.key for kv in snap.items if kv.key.removeprefix(keys.MODEL_STATUS) not in pending]
            if stale and not await self.writes.clear_pending(fence, stale):
                return False
            self._written = {}
        now = self.clock()
        for name, reason in sorted(pending.items()):
            prev = self._written.get(name)
            if prev is not None and prev.pending == reason:
                continue
            st = ModelStatus(model=name, pending=reason, since=prev.since if prev else now)
            if not await self.writes.report_pending(fence, st):
                return False
            self._written[name] = st
        gone = [n for n in self._written if n not in pending]
        if gone and not await self.writes.clear_pending(fence, [keys.model_status_key(n) for n in gone]):
            return False
        for name in gone:
            del self._written[name]
        return True
