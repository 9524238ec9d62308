"""The scheduler: the elected leader turns desired models into placements in etcd.

Inputs are mirrored from etcd (models, live nodes, current placements); each pass runs the pure `place()`
and writes only the difference. A node that vanished keeps its placements for `node_grace_s`, so a short
blip causes no rescheduling; the scheduler's own restart counts as "just seen" for every placed node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from nebula.adapters.timeouts import timeout
from nebula.core import keys, records
from nebula.core.model import ModelSpec, NodeRecord, Placement
from nebula.core.placement import PlacementResult, diff_placements, place
from nebula.core.scaling import ScalingDefaults
from nebula.core.store import EventType, LeaseLostError, Store
from nebula.errors import TemporaryError
from nebula.services.cluster.mirror import Mirror, MirrorMetrics, MirrorState
from nebula.services.cluster.writes import ClusterWrites, Fence
from nebula.services.scheduler.metrics import SchedulerMetrics
from nebula.services.scheduler.pending import PendingReporter
from nebula.services.scheduler.rollout import PassPlan, Rollouts
from nebula.services.scheduler.scaling import ScalePlan, Scaler, effective, with_sleep

log = logging.getLogger("nebula.scheduler")


class Scheduler:
    def __init__(self, store: Store, identity: str, *, lease_ttl_s: int, node_grace_s: float,
                 resync_s: float, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic,
                 gpu_headroom_mib: int = 0, scaling: ScalingDefaults | None = None,
                 wall: Callable[[], float] = time.time, scaling_pass_s: float = 5.0,
                 evict_quiet_s: float = 60.0, rollouts: Rollouts | None = None) -> None:
        self.store = store
        self.identity = identity
        self.lease_ttl_s = lease_ttl_s
        self.node_grace_s = node_grace_s
        self.resync_s = resync_s
        self.gpu_headroom_mib = gpu_headroom_mib
        self.clock = clock
        self.models: dict[str, ModelSpec] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.placements: dict[str, Placement] = {}
        self.gone_since: dict[str, float] = {}
        self.pending: dict[str, str] = {}
        self.seen: set[str] = set()
        self.wake = asyncio.Event()
        self.lost_lead = asyncio.Event()
        self.is_leader = False
        self.writes = ClusterWrites(store)
        self.pending_report = PendingReporter(store, self.writes)
        self._fence = Fence(0)
        self.fenced_writes = 0  # passes whose writes the fence refused: we had lost the lead
        self.metrics = SchedulerMetrics.create(registry, self, clock)
        # Elastic capacity (services/scheduler/scaling.py): its mirrors feed it through on_scale/on_load/on_wake.
        self.scaler = Scaler(self.writes, registry, scaling or ScalingDefaults(), notify=self.wake.set, wall=wall,
                             evict_quiet_s=evict_quiet_s, pass_s=scaling_pass_s, leading=lambda: self.is_leader)
        self.rollouts = rollouts or Rollouts(store)  # rolling replaces and node drains (services/scheduler/rollout.py)
        self.rollouts.changed = self.wake.set
        self.rollouts.finished = lambda model, outcome: self.metrics.rollouts.labels(model, outcome.value).inc()
        self._decided = PassPlan(plans={}, retire=frozenset(), surge={})

    # --- mirrored inputs ----------------------------------------------------------------------------
    def on_models(self, state: MirrorState[ModelSpec]) -> None:
        self.models = {m.name: m for m in state.records.values()}
        self._seen("models")

    def on_nodes(self, state: MirrorState[NodeRecord]) -> None:
        nodes = {n.name: n for n in state.records.values()}
        now = self.clock()
        for name in set(self.nodes) - set(nodes):
            self.gone_since.setdefault(name, now)
            log.warning("node %s is gone; its replicas move after %.0f s unless it returns", name,
                        self.node_grace_s, extra={"NEBULA_NODE": name})
        for name in nodes:
            self.gone_since.pop(name, None)
        self.nodes = nodes
        self._seen("nodes")

    def on_placements(self, state: MirrorState[Placement]) -> None:
        self.placements = {p.instance: p for p in state.records.values()}
        self._seen("placements")

    def mirrors(self, store: Store, metrics: MirrorMetrics) -> list[Mirror[Any]]:
        """Every mirror the scheduler reads (a pass waits until each has delivered its first listing)."""
        return [Mirror(store, records.MODELS, metrics, on_change=self.on_models),
                Mirror(store, records.NODES, metrics, on_change=self.on_nodes),
                Mirror(store, records.PLACEMENTS, metrics, on_change=self.on_placements),
                Mirror(store, records.SCALE, metrics, on_change=self.scaler.on_scale),
                Mirror(store, records.LOAD, metrics, on_change=self.scaler.on_load),
                Mirror(store, records.WAKE, metrics, on_change=self.scaler.on_wake),
                *self.rollouts.mirrors(store, metrics)]

    def _seen(self, what: str) -> None:
        self.seen.add(what)
        self.wake.set()

    @property
    def ready(self) -> bool:
        return self.seen >= {"models", "nodes", "placements"} and self.scaler.ready and self.rollouts.ready

    # --- one pass -----------------------------------------------------------------------------------
    def retained_nodes(self) -> set[str]:
        now = self.clock()
        for p in self.placements.values():
            if p.node not in self.nodes:
                self.gone_since.setdefault(p.node, now)  # unseen since our start: grace starts now
        return {n for n, t in self.gone_since.items() if now - t < self.node_grace_s}

    def compute(self, plan: ScalePlan | None = None) -> tuple[list[Placement], list[Placement]]:
        plan = plan if plan is not None else self.scaler.plan(self.models, self.rollouts.instances.values())
        # Rolling replaces and drains plan over the counts elastic models have now (their scale states).
        models = effective(self.models, plan.states)
        self._decided = decided = self.rollouts.plan(models, self.placements, self.nodes)
        current = {i: p for i, p in self.placements.items() if i not in decided.retire}
        retained = self.retained_nodes()
        taken = self.rollouts.taken() - decided.retire
        held_ports = self.rollouts.held_ports(current)

        def place_with(wanted: Mapping[str, ModelSpec]) -> PlacementResult:
            return place(wanted, self.nodes, current, retained_nodes=retained, gpu_reserve_mib=self.gpu_headroom_mib,
                         surge=decided.surge, drained=self.rollouts.drained, taken=taken, held_ports=held_ports)

        result = place_with(models)
        if result.pending:
            result = self.scaler.evict(plan, self.models, result, place_with)
        if result.pending != self.pending:
            for model, reason in result.pending.items():
                log.warning("model %s has replicas that fit nowhere: %s", model, reason,
                            extra={"NEBULA_MODEL": model})
        self.pending = dict(result.pending)
        wanted = with_sleep(result.placements, plan.states, self.models, self.scaler.defaults)
        return diff_placements(self.placements, wanted)

    async def schedule_once(self) -> None:
        if not self.ready:
            return
        with self.metrics.pass_seconds.time():
            plan = self.scaler.plan(self.models, self.rollouts.instances.values())
            to_write, to_delete = self.compute(plan)
            # Scale states first: the placements below follow from them.
            if not await self.scaler.apply(self._fence, plan):
                self._deposed()
                return
            if (to_write or to_delete) and not await self.writes.apply_placements(self._fence, to_write, to_delete):
                self._deposed()
                return
            for p in to_delete:
                log.info("removed placement %s from %s", p.instance, p.node,
                         extra={"NEBULA_INSTANCE": p.instance, "NEBULA_NODE": p.node})
                self.metrics.changes.labels("delete").inc()
            for p in to_write:
                log.info("placed %s on %s port %d", p.instance, p.node, p.port,
                         extra={"NEBULA_INSTANCE": p.instance, "NEBULA_NODE": p.node, "NEBULA_MODEL": p.model.name})
                self.metrics.changes.labels("write").inc()
            if (not await self.pending_report.sync(self.pending, self._fence)
                    or not await self.rollouts.apply(self._fence, self.models, self._decided)):
                self._deposed()

    def _deposed(self) -> None:
        """Our leader key is gone or another's: the fence refused the pass, so nothing of it landed."""
        self.fenced_writes += 1
        self.metrics.fenced.inc()
        log.warning("scheduler %s is no longer the leader: its writes were refused by the fence", self.identity,
                    extra={"NEBULA_SCHEDULER": self.identity})
        self.lost_lead.set()

    # --- leadership ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Campaign for leadership; while leading, schedule on every change and every resync period."""
        while True:
            try:
                lease = await self.store.grant_lease(self.lease_ttl_s)
                if await self.store.create(keys.SCHEDULER_LEADER, self.identity.encode(), lease=lease):
                    await self._lead(lease)
                else:
                    await self.store.revoke_lease(lease)
            except TemporaryError as e:
                log.warning("scheduler: store unavailable: %s", e)
            self._set_leader(False)
            await self._await_vacancy(self.lease_ttl_s)

    async def _await_vacancy(self, timeout_s: float) -> None:
        """Wait until the leader key is gone, or `timeout_s`: a standby campaigns the moment the leader's lease
        ends (a handover within the lease TTL), not on its next poll; the timeout is the fallback poll."""
        async def vacated() -> None:
            held = await self.store.get(keys.SCHEDULER_LEADER)
            if held is None:
                return
            async for ev in self.store.watch_prefix(keys.SCHEDULER_LEADER, start_revision=held.mod_revision + 1):
                if ev.key == keys.SCHEDULER_LEADER and ev.type is EventType.DELETE:
                    return

        try:
            async with timeout(timeout_s):
                await vacated()
        except TimeoutError:
            pass
        except TemporaryError as e:  # CompactedError too
            log.info("scheduler: cannot watch the leader key (%s); campaigning again shortly", e)
            await asyncio.sleep(self.lease_ttl_s / 3)

    async def _lead(self, lease: int) -> None:
        self._set_leader(True)
        self._fence = Fence(lease)
        self.lost_lead.clear()
        self.pending_report.reset()
        self.scaler.reset()
        self.rollouts.reset()
        keepalive = asyncio.create_task(self._keep_lease(lease))
        try:
            while not keepalive.done() and not self.lost_lead.is_set():
                await self.schedule_once()
                self.wake.clear()
                waiter = asyncio.create_task(self.wake.wait())
                try:
                    tick = min(self.resync_s, self._grace_tick(), self.scaler.tick_s(self.models) or self.resync_s)
                    await asyncio.wait({waiter, keepalive}, timeout=tick,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()  # also when we are cancelled: no task left pending
            if keepalive.done():
                keepalive.result()
        finally:
            keepalive.cancel()
            try:
                await self.store.revoke_lease(lease)
            except TemporaryError:
                pass

    def _grace_tick(self) -> float:
        # Wake when the first gone node's grace ends, so its replicas move on time.
        if not self.gone_since:
            return self.resync_s
        now = self.clock()
        return max(0.1, min(t + self.node_grace_s - now for t in self.gone_since.values()) + 0.05)

    async def _keep_lease(self, lease: int) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            try:
                await self.store.keepalive(lease)
            except LeaseLostError:
                log.warning("scheduler lost its leader lease")
                return
            except TemporaryError as e:
                log.warning("leader keepalive failed: %s", e)

    def _set_leader(self, leading: bool) -> None:
        if leading != self.is_leader:
            log.info("scheduler %s %s", self.identity, "is now the leader" if leading else "is not the leader")
        self.is_leader = leading
        self.metrics.leader.set(1 if leading else 0)
