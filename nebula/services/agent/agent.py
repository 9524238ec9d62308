"""The node agent: realizes this node's placements as engine units and reports each instance's phase.

Desired state: `/nebula/placements/<node>/` (scheduler-written). Actual state: the engine units this node
has (systemd or child processes) and the spec files they were started with. Each pass computes a pure
plan and applies it; a restarted agent finds running engines with unchanged specs and leaves them alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from prometheus_client import CollectorRegistry

from nebula.adapters.timeouts import timeout
from nebula.core import keys, records
from nebula.core.config import NebulaConfig
from nebula.core.engine_args import check_engine_request
from nebula.core.engine_runtime import missing_runtime
from nebula.core.engine_spec import EngineSpec, gpu_memory_share
from nebula.core.lora import AdapterSpec, EngineAdapters
from nebula.core.model import InstanceStatus, NodeRecord, Phase, Placement, parse_instance_name, with_history
from nebula.core.phase import Failures, between_restarts, error_line, observe_phase, repeated, restart_verdict
from nebula.core.pulls import PullIntent
from nebula.core.reconcile import RUNNING_STATES, Action, Actual, RemoveSpec, ResetFailed, Start, Stop, plan
from nebula.core.restarts import RestartBook
from nebula.core.store import Store
from nebula.core.units import EngineUnits, UnitState, UnitStatus
from nebula.errors import TemporaryError, ValidationError
from nebula.services.agent.drain import EngineDrain
from nebula.services.agent.gpus import GpuSampler, engine_view, gpu_records
from nebula.services.agent.lora import LoraSync
from nebula.services.agent.metrics import AgentMetrics
from nebula.services.agent.pulls import PullWorker
from nebula.services.agent.sleep import EngineSleep, SleepSync
from nebula.services.agent.sources import Broken, Fetching, ModelSources, build_sources
from nebula.services.agent.specfiles import SpecFiles
from nebula.services.cluster.mirror import MirrorState
from nebula.services.cluster.writes import ClusterWrites

log = logging.getLogger("nebula.agent")
# Enough of the output to reach past the supervisor's epilogue and pydantic's detail lines to the error.
FAILURE_LINES = 40
HealthCheck = Callable[[str], Awaitable[bool]]


class NodeAgent:
    def __init__(self, cfg: NebulaConfig, node: NodeRecord, store: Store, units: EngineUnits,
                 specs: SpecFiles, health: HealthCheck, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.time, sources: ModelSources | None = None,
                 runtimes: Callable[[], tuple[str, ...]] | None = None, gpus: GpuSampler | None = None,
                 lora: EngineAdapters | None = None, sleep: EngineSleep | None = None,
                 drain: EngineDrain | None = None) -> None:
        self.cfg = cfg
        self.node = node
        self.store = store
        self.units = units
        self.specs = specs
        self.health = health
        self.clock = clock
        self.runtimes = runtimes  # the engine runtimes installed here, read again each pass; None: node.runtimes
        self.metrics = AgentMetrics.create(registry)
        self.placements: dict[str, Placement] = {}
        self.placements_known = False
        self.wake = asyncio.Event()
        self.sources = sources or build_sources(cfg.node, registry, on_change=self.wake.set, clock=clock)
        self.writes = ClusterWrites(store)
        self.pulls = PullWorker(node.name, self.writes, self.sources)
        self._fetching: dict[str, Fetching] = {}
        self.lease = 0
        self._reported: dict[str, InstanceStatus] = {}
        self._healthy: set[str] = set()
        self._stale_forgotten = False
        self.restart_book = RestartBook()
        self._failures_seen: set[str] = set()
        self._failure_errors: dict[str, list[str]] = {}
        self._stopped: dict[str, EngineSpec] = {}  # stopped between systemd's restarts, with the spec that failed
        self._restart_due: frozenset[str] = frozenset()
        self.gpus = gpus
        self.lora = LoraSync(lora, self.sources, clock, node.name)  # LoRA adapters on the engines (lora.py)
        self.sleep = SleepSync(sleep, node.name)  # vLLM sleep mode on the engines (sleep.py)
        self.drain = drain  # removed replicas finish their requests before they stop (drain.py); None: stop at once

    # --- inputs -------------------------------------------------------------------------------------
    def on_placements(self, state: MirrorState[Placement]) -> None:
        """The placements mirror's callback: the full set of this node's placements, each validated (its
        instance name, its node, its key) by the mirror."""
        self.placements = {p.instance: p for p in state.records.values()}
        self.placements_known = True
        self.wake.set()

    def on_pulls(self, state: MirrorState[PullIntent]) -> None:
        """The pulls mirror's callback: the full set of this node's pull intents (`nebula pull`)."""
        self.pulls.on_pulls(state)
        self.wake.set()

    def on_adapters(self, state: MirrorState[AdapterSpec]) -> None:
        """The LoRA adapters mirror's callback: every adapter record (each agent serves those of its bases)."""
        self.lora.on_adapters(state)
        self.wake.set()

    def status_line(self) -> str:
        """The agent unit's STATUS=: its instances, and the downloads in progress with their progress."""
        return "; ".join([f"{len(self.placements)} instance(s)", *self.sources.progress_lines()])

    async def on_new_lease(self, lease: int) -> None:
        """Register (again) under a new lease: the node record and every instance state."""
        self.lease = lease
        await self.writes.register_node(self.node, lease)
        self._reported.clear()
        self.pulls.forget_reports()
        self.wake.set()

    # --- one pass -----------------------------------------------------------------------------------
    def desired(self) -> tuple[dict[str, EngineSpec], dict[str, str]]:
        """Engine specs to run, and the instances that cannot run with the reason (shown as failed).

        Instances whose weights are still downloading are neither: they are in `self._fetching`.
        """
        specs: dict[str, EngineSpec] = {}
        blocked: dict[str, str] = {}
        self._fetching = {}
        for inst, p in self.placements.items():
            # The model family's flags (parsers, from its profile) first; the spec's own engine_args may override.
            engine_args = (p.model.profile.family_args() if p.model.profile else ()) + p.model.engine_args
            try:  # a placement in etcd may have been written by anything, not only the admin API
                check_engine_request(engine_args, p.model.trust_remote_code,
                                     self.cfg.engine.allowed_engine_args, self.cfg.engine.allow_trust_remote_code)
            except ValidationError as e:
                blocked[inst] = f"refused by this node: {e}"
                continue
            if reason := missing_runtime(p.model.engine_runtime, self.node.runtimes, self.cfg.engine):
                blocked[inst] = reason
                continue
            res = self.sources.resolve(p.model.source, p.model.revision)
            if isinstance(res, Broken):
                blocked[inst] = res.message
                continue
            if isinstance(res, Fetching):
                self._fetching[inst] = res
                continue
            specs[inst] = EngineSpec(instance=inst, model=p.model.name, source=res.path, port=p.port,
                                     host=self.cfg.node.engine_host, task=p.model.task,
                                     max_model_len=p.model.max_model_len, engine_args=engine_args,
                                     gpu_indices=p.gpu_indices, trust_remote_code=p.model.trust_remote_code,
                                     engine_runtime=p.model.engine_runtime,
                                     tensor_parallel_size=p.model.tensor_parallel_size,
                                     sleep_mode=p.sleep_mode and bool(p.gpu_indices),
                                     gpu_memory_utilization=gpu_memory_share(p.model.gpu_memory_mib,
                                                                             self.node.gpus, p.gpu_indices))
        return specs, blocked

    async def advertise_cache(self) -> None:
        """Keep the node record's lists of cached sources (the scheduler prefers nodes holding a model) and of
        installed engine runtimes (a runtime installed while the agent runs counts within a pass) current."""
        cached = self.sources.cached()
        runtimes = self.runtimes() if self.runtimes is not None else self.node.runtimes
        if cached != self.node.cached or runtimes != self.node.runtimes:
            self.node = replace(self.node, cached=cached, runtimes=runtimes)
            await self.writes.register_node(self.node, self.lease)

    async def advertise_gpus(self, units: Mapping[str, UnitStatus]) -> None:
        """Tell the GPU sampler which engines run (whose memory is Nebula's), and keep the node record's
        memory used outside Nebula current, rewritten only when it moved by [node] gpu_outside_step_mib."""
        if self.gpus is None:
            return
        declared: dict[int, int] = {}
        for p in self.placements.values():
            for i in p.gpu_indices:
                declared[i] = declared.get(i, 0) + p.model.gpu_memory_mib
        self.gpus.engines = engine_view(units, declared, placed=self.placements.keys())
        gpus = gpu_records(self.node.gpus, self.gpus.readings, self.gpus.outside_mib(),
                           self.cfg.node.gpu_outside_step_mib)
        if gpus is not None:
            self.node = replace(self.node, gpus=gpus)
            await self.writes.register_node(self.node, self.lease)

    async def reconcile_once(self) -> None:
        if not self.placements_known:
            return  # never act on an empty view before the first listing: that would stop every engine
        if not self._stale_forgotten:
            await self.forget_stale_instances()
            self._stale_forgotten = True
        desired, blocked = self.desired()
        await self.pulls.step(self.lease)
        self.sources.forget_unused({p.model.source_id for p in self.placements.values()} | self.pulls.source_ids()
                                   | self.lora.source_ids())
        await self.advertise_cache()
        units = dict(await self.units.list())
        files = self.specs.read_all()
        actual = {i: Actual(unit=units.get(i), spec=files.get(i)) for i in set(units) | set(files)}
        restart = await self.note_failures(desired, units)
        # An engine stopped for failing the same way twice stays down until its spec changes.
        self._stopped = {i: spec for i, spec in self._stopped.items() if desired.get(i) == spec}
        hold = await self.drain.hold({i: files[i].endpoint for i, u in units.items() if i in files and i not in
                                      self.placements and u.state in RUNNING_STATES}) if self.drain else frozenset()
        actions = plan({i: spec for i, spec in desired.items() if i not in self._stopped}, actual, restart, hold)
        for action in actions:
            await self.apply(action)
        if actions:  # re-read only what the actions changed; most passes have none
            units = dict(await self.units.list())
            files = self.specs.read_all()
        await self.check_health(units, files)
        await self.lora.sync(files, self._healthy)
        await self.sleep.sync(self.placements, files, self._healthy)
        await self.advertise_gpus(units)
        await self.report(desired, blocked, units)
        self.metrics.passes.inc()

    async def note_failures(self, desired: Mapping[str, EngineSpec], units: Mapping[str, UnitStatus]
                            ) -> frozenset[str]:
        """Record new engine failures with their one-line reason, and say which to restart.

        Only back-ends without a service manager's own Restart= get restarts from the agent, and only while
        `restart_verdict` allows (budget left, not the same error twice).
        """
        now = self.clock()
        for inst, unit in units.items():
            if unit.state is not UnitState.FAILED and not between_restarts(unit):
                self._failures_seen.discard(inst)
                continue
            if inst in self._failures_seen:
                continue
            self._failures_seen.add(inst)
            if not self.units.restarts_failed:
                self.restart_book.failed(inst, now)
            lines = await self.units.recent_output(inst, FAILURE_LINES)
            error = error_line(lines)
            self._failure_errors.setdefault(inst, []).append(error)
            model = desired[inst].model if inst in desired else parse_instance_name(inst)[0]
            self.metrics.failures.labels(model).inc()
            log.warning("engine %s failed (%s): %s", inst, unit.result or "?", error,
                        extra={"NEBULA_INSTANCE": inst, "NEBULA_NODE": self.node.name, "NEBULA_MODEL": model,
                               "NEBULA_RESULT": unit.result, "NEBULA_ERROR": error})
            if between_restarts(unit) and inst in desired and repeated(self._failure_errors[inst]):
                # systemd would go on restarting it until StartLimitBurst; another start can only say it again.
                log.warning("engine %s failed twice with the same error; stopping its restarts", inst,
                            extra={"NEBULA_INSTANCE": inst, "NEBULA_NODE": self.node.name, "NEBULA_MODEL": model,
                                   "NEBULA_ERROR": error})
                await self.units.stop(inst)
                self._stopped[inst] = desired[inst]
        for inst in list(self._failure_errors):
            if inst not in desired and inst not in units:
                self._failure_errors.pop(inst)
                self.restart_book.forget(inst)
        self._restart_due = frozenset(i for i in desired if i in self._failures_seen and self._restarting(i, now)
                                      and self.restart_book.may_restart(i, now))
        return self._restart_due

    def _restarting(self, inst: str, now: float) -> bool:
        return restart_verdict(self._failure_errors.get(inst, ()), agent_restarts=not self.units.restarts_failed,
                               budget_left=not self.restart_book.given_up(inst, now))

    async def apply(self, action: Action) -> None:
        kind = type(action).__name__.lower()
        fields = {"NEBULA_INSTANCE": action.instance, "NEBULA_NODE": self.node.name}
        if isinstance(action, Stop):
            log.info("stopping engine %s: %s", action.instance, action.reason, extra=fields)
            await self.units.stop(action.instance)
        elif isinstance(action, Start):
            log.info("starting engine %s on port %d", action.instance, action.spec.port,
                     extra=fields | {"NEBULA_MODEL": action.spec.model})
            self.specs.write(action.spec)
            await self.units.start(action.instance)
            if action.instance in self._restart_due:  # the one place a restart is counted
                self.restart_book.restarted(action.instance)
            elif action.instance in self._failure_errors:  # a fresh start (a changed spec): a new history
                self._failure_errors.pop(action.instance)
                self.restart_book.forget(action.instance)
            self._failures_seen.discard(action.instance)  # its next failure is a new one
        elif isinstance(action, ResetFailed):
            await self.units.reset(action.instance)
        elif isinstance(action, RemoveSpec):
            self.specs.remove(action.instance)
        self.metrics.actions.labels(kind).inc()

    async def check_health(self, units: Mapping[str, UnitStatus], files: Mapping[str, EngineSpec]) -> None:
        active = [i for i, u in units.items() if u.state is UnitState.ACTIVE and i in files]
        results = await asyncio.gather(*(self.health(files[i].endpoint) for i in active))
        self._healthy = {i for i, ok in zip(active, results, strict=True) if ok}

    def observe(self, desired: Mapping[str, EngineSpec], blocked: Mapping[str, str],
                units: Mapping[str, UnitStatus]) -> dict[str, InstanceStatus]:
        now = self.clock()
        out: dict[str, InstanceStatus] = {}
        for inst, p in self.placements.items():
            unit = units.get(inst)
            fetching = self._fetching.get(inst)
            failures = Failures(restarts=self._restarts(inst, unit),
                                errors=tuple(self._failure_errors.get(inst, ())),
                                restarting=self._restarting(inst, now), stopped=inst in self._stopped)
            phase, message = observe_phase(blocked=blocked.get(inst), unit=unit, healthy=inst in self._healthy,
                                           downloading=fetching is not None, failures=failures)
            if fetching is not None:
                message = fetching.message
            endpoint = f"http://{self.node.address}:{p.port}"
            out[inst] = self._status(inst, p.model.name, phase, message, endpoint, p, unit, now)
            if fetching is not None:
                out[inst] = replace(out[inst], progress=fetching.progress)
        for inst, unit in units.items():
            if inst in out or unit.state not in (UnitState.DEACTIVATING, UnitState.ACTIVE, UnitState.ACTIVATING):
                continue
            prev = self._reported.get(inst)
            if prev is not None:  # an unplaced instance we still run: draining until its unit is down
                out[inst] = InstanceStatus(instance=inst, model=prev.model, node=self.node.name,
                                           phase=Phase.DRAINING, endpoint=prev.endpoint, task=prev.task,
                                           since=prev.since if prev.phase is Phase.DRAINING else now,
                                           message="unloading", restarts=unit.restarts)
        return {inst: with_history(self._reported.get(inst), st) for inst, st in out.items()}

    def _status(self, inst: str, model: str, phase: Phase, message: str, endpoint: str, p: Placement,
                unit: UnitStatus | None, now: float) -> InstanceStatus:
        phase, message = self.sleep.phase(inst, phase, message)
        prev = self._reported.get(inst)
        since = prev.since if prev is not None and prev.phase is phase else now
        adapters = self.lora.report(inst)
        return InstanceStatus(instance=inst, model=model, node=self.node.name, phase=phase, endpoint=endpoint,
                              task=p.model.task, since=since, message=message,
                              restarts=self._restarts(inst, unit), adapters=adapters.loaded,
                              adapter_errors=adapters.errors)

    def _restarts(self, inst: str, unit: UnitStatus | None) -> int:
        if not self.units.restarts_failed:
            return self.restart_book.restarts(inst)
        return unit.restarts if unit else 0

    async def report(self, desired: Mapping[str, EngineSpec], blocked: Mapping[str, str],
                     units: Mapping[str, UnitStatus]) -> None:
        statuses = self.observe(desired, blocked, units)
        for inst, st in statuses.items():
            prev = self._reported.get(inst)
            if prev == st:
                continue
            if prev is None or prev.phase is not st.phase:
                log.info("instance %s: %s -> %s %s", inst, prev.phase.value if prev else "-", st.phase.value,
                         st.message, extra={"NEBULA_INSTANCE": inst, "NEBULA_MODEL": st.model,
                                            "NEBULA_NODE": self.node.name, "NEBULA_PHASE": st.phase.value})
            await self.writes.report_instance(st, self.lease)
            self._reported[inst] = st
        for inst in list(self._reported):
            if inst not in statuses:
                log.info("instance %s gone", inst, extra={"NEBULA_INSTANCE": inst, "NEBULA_NODE": self.node.name})
                await self.writes.forget_instance(keys.instance_key(inst))
                del self._reported[inst]
        self.metrics.observe(statuses)

    async def forget_stale_instances(self) -> None:
        """Delete instance keys a previous run of this agent left for instances it no longer has."""
        snap = await self.store.list_prefix(keys.INSTANCES)
        for kv in snap.items:
            try:
                st = records.INSTANCES.decode(kv.key, kv.value)
            except ValidationError:
                continue  # not ours to judge: only the node that wrote it may remove it
            if st.node == self.node.name and st.instance not in self.placements:
                await self.writes.forget_instance(kv.key)

    async def run(self) -> None:
        """Reconcile on every placement change and every resync period, until cancelled."""
        period = self.cfg.node.resync_s
        while True:
            try:
                with self.metrics.pass_seconds.time():
                    await self.reconcile_once()
            except TemporaryError as e:
                log.warning("reconcile pass failed, retrying: %s", e)
            try:
                async with timeout(self._next_wait(period)):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()

    def _next_wait(self, period: float) -> float:
        # Poll fast while something is changing (starting, draining), so the gateways learn within ~1 s.
        settling = any(s.phase in (Phase.PENDING, Phase.DOWNLOADING, Phase.STARTING, Phase.DRAINING)
                       for s in self._reported.values()) or bool(self.sources.downloading())
        return min(period, 1.0) if settling else period
