"""The writes of a rolling replace and of a node drain, each one guarded transaction (services/cluster/writes.py
has the rest; core/keys.py names each key's writer).

- The admin API's update writes the model's new spec and the rollout record together, only while no rollout
  record exists and the model is as it read it: a second update while one runs is refused, naming it.
- The scheduler leader's progress, completion and rollback are fenced by its leader key. A rollback writes the
  model key (the documented exception to its single writer), guarded by that key's mod revision and only when
  it still holds the spec the rollout was moving to: an admin's later write always wins.
- Drains are the admin API's.
"""

from __future__ import annotations

from dataclasses import replace

from nebula.core import keys, records
from nebula.core.model import ModelSpec, dumps
from nebula.core.rollout import same_engine
from nebula.core.rollout_records import DrainRecord, RolloutRecord, RolloutStatus
from nebula.core.store import Delete, Guard, Op, Put, Store
from nebula.errors import TemporaryError, ValidationError
from nebula.services.cluster.writes import CAS_ATTEMPTS, Conflict, Fence


class UpdateInProgress(TemporaryError):
    """Another update of the model is rolling: the message names it."""

    def __init__(self, record: RolloutRecord | None) -> None:
        self.record = record
        who = f" by {record.by}" if record is not None and record.by else ""
        super().__init__(f"model '{record.model if record else '?'}' is already being updated{who} (nebula update; "
                         "nebula status shows its progress): wait until it is done or rolled back"
                         if record is not None else "the model is already being updated: wait until it is done")


class RolloutWrites:
    def __init__(self, store: Store) -> None:
        self._store = store

    # --- the admin API's ------------------------------------------------------------------------------------
    async def read_model(self, name: str) -> tuple[ModelSpec, int] | None:
        """The stored spec and its mod revision; None when it is not loaded. ValidationError: a damaged record."""
        kv = await self._store.get(keys.model_key(name))
        if kv is None:
            return None
        return records.MODELS.decode(kv.key, kv.value), kv.mod_revision

    async def read_rollout(self, name: str) -> RolloutRecord | None:
        kv = await self._store.get(keys.rollout_key(name))
        if kv is None:
            return None
        try:
            return records.ROLLOUTS.decode(kv.key, kv.value)
        except ValidationError:
            return None

    async def read_status(self, name: str) -> RolloutStatus | None:
        kv = await self._store.get(keys.rollout_status_key(name))
        if kv is None:
            return None
        try:
            return records.ROLLOUT_STATUS.decode(kv.key, kv.value)
        except ValidationError:
            return None

    async def start_update(self, record: RolloutRecord, model_revision: int) -> None:
        """Write the new spec and its rollout record in one transaction. UpdateInProgress while another rollout
        record exists; Conflict when the model changed since it was read at `model_revision`."""
        model, rollout = keys.model_key(record.model), keys.rollout_key(record.model)
        guards = [Guard(model, mod_revision=model_revision), Guard(rollout, mod_revision=0)]
        if await self._store.commit(guards, [Put(model, dumps(record.target.to_dict())),
                                             Put(rollout, dumps(record.to_dict()))]):
            return
        if await self._store.get(rollout) is not None:
            raise UpdateInProgress(await self.read_rollout(record.model))
        raise Conflict(f"model '{record.model}' changed while it was being updated; retry")

    async def drain(self, record: DrainRecord) -> bool:
        """False when the node is drained already (its record is left as it is)."""
        key = keys.drain_key(record.node)
        return await self._store.commit([Guard(key, mod_revision=0)], [Put(key, dumps(record.to_dict()))])

    async def undrain(self, node: str) -> bool:
        return await self._store.delete(keys.drain_key(node))

    # --- the scheduler leader's, fenced ---------------------------------------------------------------------
    async def report(self, fence: Fence, status: RolloutStatus, *, finish: bool = False) -> bool:
        """Write the status (and, when `finish`, delete the rollout record); False once the fence has fallen."""
        ops: list[Op] = [Put(keys.rollout_status_key(status.model), dumps(status.to_dict()))]
        if finish:
            ops.append(Delete(keys.rollout_key(status.model)))
        return await self._store.commit([fence.guard], ops)

    async def forget(self, fence: Fence, model: str) -> bool:
        """Delete the rollout record of a model that was unloaded mid-rollout."""
        return await self._store.commit([fence.guard], [Delete(keys.rollout_key(model))])

    async def roll_back(self, fence: Fence, rolling_to: ModelSpec, previous: ModelSpec, status: RolloutStatus
                        ) -> bool | None:
        """Write `previous` back as the model's spec, delete the rollout record and write the status, in one
        transaction. None (nothing written) when the model no longer holds `rolling_to` (an admin changed or
        unloaded it: theirs wins); False once the fence has fallen."""
        key = keys.model_key(previous.name)
        for _ in range(CAS_ATTEMPTS):
            kv = await self._store.get(key)
            if kv is None:
                return None
            try:
                current = records.MODELS.decode(key, kv.value)
            except ValidationError:
                return None
            if not same_engine(current, rolling_to):
                return None
            # Today's count and policy stay (a scale during the rollout is not undone).
            back = replace(previous, replicas=current.replicas, scaling=current.scaling)
            ops: list[Op] = [Put(key, dumps(back.to_dict())), Delete(keys.rollout_key(previous.name)),
                   Put(keys.rollout_status_key(status.model), dumps(status.to_dict()))]
            if await self._store.commit([fence.guard, Guard(key, mod_revision=kv.mod_revision)], ops):
                return True
            if not await self._store.commit([fence.guard], []):
                return False
        raise Conflict(f"model '{previous.name}' is changing concurrently; retry the rollback")
