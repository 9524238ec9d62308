"""`ClusterWrites`: every write Nebula makes to the cluster's state, each one guarded transaction.

Each key has one writer (core/keys.py names it), and each writer's writes are here, next to the guard
that makes them safe:
- the admin API's (models, keys, pulls) compare what they read, so two admins racing cannot overwrite
  each other, and the key set can never lose its last admin key;
- the scheduler leader's (placements, pending reasons, scale states, wake deletes) are fenced by its leader
  key held under its own lease: once that lease has expired, nothing it writes lands, even before it
  notices (Nomad's plan applier re-checks a plan where it lands; this is the same idea in one etcd
  transaction);
- a node agent's (its node record, its instances' phases, its pulls' progress) are under its lease;
- a gateway worker's load report is under its own lease; its wake requests are created only where none is.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from nebula.core import keys, records
from nebula.core.apikeys import KeyRecord, KeyScope
from nebula.core.elastic import LoadReport, ScaleState, WakeRequest
from nebula.core.lora import AdapterSpec
from nebula.core.model import InstanceStatus, ModelSpec, NodeRecord, Placement, dumps
from nebula.core.pulls import PullIntent, PullStatus
from nebula.core.status import ModelStatus
from nebula.core.store import Delete, Guard, KeyValue, Op, Put, Store
from nebula.errors import PermanentError, TemporaryError, ValidationError

log = logging.getLogger("nebula.cluster")

CAS_ATTEMPTS = 10
# etcd refuses a transaction of more than --max-txn-ops (128 by default) operations.
MAX_TXN_OPS = 100


class Conflict(TemporaryError):
    """The record changed between our read and our write, every time we tried: retry later."""


class Refused(PermanentError):
    """The write would break an invariant of the cluster (the message says which, and the fix)."""


class LoadOutcome(enum.Enum):
    CREATED = "created"
    SAME = "same"  # loaded already with this very spec: nothing written
    DIFFERENT = "different"  # loaded already with another spec: nothing written


@dataclass(frozen=True)
class Fence:
    """The scheduler leader's hold on its leader key: writes made under it land only while it holds."""

    lease: int

    @property
    def guard(self) -> Guard:
        return Guard(keys.SCHEDULER_LEADER, lease=self.lease)


class ClusterWrites:
    def __init__(self, store: Store) -> None:
        self._store = store

    # --- models (admin API) -------------------------------------------------------------------------------
    async def load_model(self, spec: ModelSpec) -> LoadOutcome:
        """Refused: the name is a LoRA adapter's (they share the namespace the engines route by)."""
        key = keys.model_key(spec.name)
        adapter = Guard(keys.adapter_key(spec.name), mod_revision=0)
        for _ in range(CAS_ATTEMPTS):
            if await self._store.commit([Guard(key, mod_revision=0), adapter], [Put(key, dumps(spec.to_dict()))]):
                return LoadOutcome.CREATED
            kv = await self._store.get(key)
            if kv is None:
                if await self._store.get(adapter.key) is not None:
                    raise Refused(f"'{spec.name}' is the name of a LoRA adapter: choose another name, or remove the "
                                  f"adapter first (nebula adapter rm {spec.name})")
                continue  # unloaded between our write and our read: try again
            try:
                current = records.MODELS.decode(key, kv.value)
            except ValidationError:
                return LoadOutcome.DIFFERENT  # a damaged record: the operator unloads it first
            return LoadOutcome.SAME if current == spec else LoadOutcome.DIFFERENT
        raise Conflict(f"model '{spec.name}' is changing concurrently; retry")

    async def scale_model(self, name: str, replicas: object) -> ModelSpec | None:
        """The model with its new replica count (validated like a load), or None when it is not loaded.
        Refused for an elastic model: the scheduler sets its count within its policy's bounds."""
        key = keys.model_key(name)
        for _ in range(CAS_ATTEMPTS):
            kv = await self._store.get(key)
            if kv is None:
                return None
            current = records.MODELS.decode(key, kv.value)
            if (policy := current.scaling) is not None:
                raise Refused(f"model '{name}' scales itself: the scheduler keeps it between {policy.min_replicas} "
                              f"and {policy.max_replicas} replicas by load and idleness (its scaling policy); to "
                              "change the bounds, unload it and load it again with --min-replicas/--max-replicas")
            wanted = ModelSpec.from_dict(current.to_dict() | {"replicas": replicas})
            if wanted == current or await self._store.commit([Guard(key, mod_revision=kv.mod_revision)],
                                                             [Put(key, dumps(wanted.to_dict()))]):
                return wanted
        raise Conflict(f"model '{name}' is changing concurrently; retry")

    async def unload_model(self, name: str) -> bool:
        """False when it is not loaded. Refused while LoRA adapters name it as their base: they would be
        left serving nothing (an adapter added during the unload can still slip by; it then answers 404)."""
        listing = await self._store.list_prefix(keys.ADAPTERS)
        served = sorted(a.name for a in _adapters(listing.items) if a.base == name)
        if served:
            raise Refused(f"model '{name}' is the base of LoRA adapter(s) {', '.join(served)}: remove them first "
                          f"(nebula adapter rm {served[0]}), then unload it")
        return await self._store.delete(keys.model_key(name))

    # --- LoRA adapters (admin API) -------------------------------------------------------------------------
    async def add_adapter(self, adapter: AdapterSpec, base_revision: int) -> bool:
        """Store a new adapter; False when one of that name exists. Lands only while its base model is as the
        caller read and checked it (`base_revision`), and no model has the adapter's name."""
        key = keys.adapter_key(adapter.name)
        guards = [Guard(key, mod_revision=0), Guard(keys.model_key(adapter.name), mod_revision=0),
                  Guard(keys.model_key(adapter.base), mod_revision=base_revision)]
        if await self._store.commit(guards, [Put(key, dumps(adapter.to_dict()))]):
            return True
        if await self._store.get(key) is not None:
            return False
        raise Conflict(f"model '{adapter.base}' or '{adapter.name}' changed while the adapter was added; retry")

    async def remove_adapter(self, name: str) -> bool:
        return await self._store.delete(keys.adapter_key(name))

    # --- API keys (admin API) -----------------------------------------------------------------------------
    async def create_key(self, record: KeyRecord, *, config_admin: bool) -> bool:
        """Store a new key; False on an id collision. Refused: the first key that is not an admin key
        while no admin key exists, since from then on every call needs a key and none could open the
        admin API again."""
        key = keys.apikey_key(record.id)
        guards = [Guard(key, mod_revision=0)]
        if KeyScope.ADMIN not in record.scopes and not config_admin:
            admins = await self._admin_keys()
            if not admins:
                raise Refused("no admin key exists yet, and once any key exists every call needs one: create an "
                              "admin key first (nebula keys create NAME --scope admin)")
            guards.append(admins[0])  # that admin key must still be there when ours lands
        return await self._store.commit(guards, [Put(key, dumps(record.to_dict()))])

    async def revoke_key(self, key_id: str, *, config_admin: bool) -> bool:
        """Delete a key; False when there is none. Refused: the last admin key (the gateway would be locked)."""
        key = keys.apikey_key(key_id)
        for _ in range(CAS_ATTEMPTS):
            kv = await self._store.get(key)
            if kv is None:
                return False
            guards = [Guard(key, mod_revision=kv.mod_revision)]
            if not config_admin and _is_admin(key, kv.value):
                others = [g for g in await self._admin_keys() if g.key != key]
                if not others:
                    raise Refused(f"key {key_id} is the last admin key: create another admin key before revoking it "
                                  "(nebula keys create NAME --scope admin)")
                guards.append(others[0])
            if await self._store.commit(guards, [Delete(key)]):
                return True
        raise Conflict(f"API key {key_id} is changing concurrently; retry")

    async def _admin_keys(self) -> list[Guard]:
        """A guard on each stored admin key as it is now."""
        snapshot = await self._store.list_prefix(keys.APIKEYS)
        return [Guard(kv.key, mod_revision=kv.mod_revision) for kv in snapshot.items if _is_admin(kv.key, kv.value)]

    # --- pulls (admin API) --------------------------------------------------------------------------------
    async def add_pull(self, intent: PullIntent) -> None:
        await self._store.put(keys.pull_key(intent.node, intent.id), dumps(intent.to_dict()))

    async def remove_pull(self, node: str, pull_id: str) -> bool:
        return await self._store.delete(keys.pull_key(node, pull_id))

    # --- the scheduler leader's, fenced -------------------------------------------------------------------
    async def apply_placements(self, fence: Fence, writes: Sequence[Placement], deletes: Sequence[Placement]) -> bool:
        """Write and delete placements under the leader's fence; False (nothing more written) once it is gone.

        Deletes go first, in transactions of their own, so a replica's old slot is free before a new one
        takes it; a batch larger than etcd takes goes in several transactions, each fenced."""
        ops: list[Op] = [Delete(keys.placement_key(p.node, p.instance)) for p in deletes]
        ops += [Put(keys.placement_key(p.node, p.instance), dumps(p.to_dict())) for p in writes]
        for start in range(0, len(ops), MAX_TXN_OPS):
            if not await self._store.commit([fence.guard], ops[start:start + MAX_TXN_OPS]):
                return False
        return True

    async def apply_scaling(self, fence: Fence, states: Sequence[ScaleState], deletes: Sequence[str]) -> bool:
        """Write elastic models' scale states and delete `deletes` (scale states of models gone, wake requests
        acted on) under the leader's fence; False (nothing more written) once it is gone."""
        ops: list[Op] = [Delete(k) for k in deletes]
        ops += [Put(keys.scale_key(s.model), dumps(s.to_dict())) for s in states]
        for start in range(0, len(ops), MAX_TXN_OPS):
            if not await self._store.commit([fence.guard], ops[start:start + MAX_TXN_OPS]):
                return False
        return True

    async def report_pending(self, fence: Fence, status: ModelStatus) -> bool:
        return await self._store.commit([fence.guard], [Put(keys.model_status_key(status.model),
                                                            dumps(status.to_dict()), lease=fence.lease)])

    async def clear_pending(self, fence: Fence, model_status_keys: Sequence[str]) -> bool:
        return await self._store.commit([fence.guard], [Delete(k) for k in model_status_keys])

    # --- a node agent's, under its lease ------------------------------------------------------------------
    async def register_node(self, node: NodeRecord, lease: int) -> None:
        await self._store.put(keys.node_key(node.name), dumps(node.to_dict()), lease=lease)

    async def report_instance(self, status: InstanceStatus, lease: int) -> None:
        await self._store.put(keys.instance_key(status.instance), dumps(status.to_dict()), lease=lease)

    async def forget_instance(self, instance_key: str) -> None:
        await self._store.delete(instance_key)

    async def report_pull(self, status: PullStatus, lease: int) -> None:
        await self._store.put(keys.pull_status_key(status.node, status.id), dumps(status.to_dict()), lease=lease)

    async def forget_pull(self, node: str, pull_id: str) -> None:
        await self._store.delete(keys.pull_status_key(node, pull_id))


    # --- a gateway worker's: its load under its own lease, and wake requests (put if absent) -------------
    async def publish_load(self, report: LoadReport, lease: int) -> None:
        await self._store.put(keys.load_key(report.reporter), dumps(report.to_dict()), lease=lease)

    async def request_wake(self, wake: WakeRequest) -> bool:
        """Create the model's wake request unless one is there already (the scheduler leader deletes it once it
        acted): True when this call created it. No lease: the request outlives the worker that made it."""
        return await self._store.create(keys.wake_key(wake.model), dumps(wake.to_dict()))


def _adapters(items: Sequence[KeyValue]) -> list[AdapterSpec]:
    """The valid adapter records among `items` (a damaged one is the mirrors' to report, not a reason to
    refuse an unload)."""
    out = []
    for kv in items:
        try:
            out.append(records.ADAPTERS.decode(kv.key, kv.value))
        except ValidationError:
            continue
    return out


def _is_admin(key: str, value: bytes) -> bool:
    try:
        return KeyScope.ADMIN in records.APIKEYS.decode(key, value).scopes
    except ValidationError:
        return False

