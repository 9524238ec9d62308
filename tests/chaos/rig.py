"""The one cluster the chaos suite keeps for all its faults, and how a fault is run and measured.

Process mode: the control plane runs as processes that the harness restarts as systemd's Restart=on-failure
would (RestartSec=2); engines run as the node agents' children. etcd starts as one member (the default
install), and grows to three members halfway."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.chaos import probes
from tests.chaos.load import LoadGenerator, Outcome
from tests.chaos.report import FaultRow
from tests.harness.cluster import NebulaCluster
from tests.harness.etcd import EtcdCluster, EtcdServer

MODEL = "duo"
REPLICAS = 2
LEASE_TTL_S = 5  # the harness's cluster.lease_ttl_s
# Long enough for the requests a fault overlapped to end before its figures are taken.
SETTLE_S = 3.0


@dataclass
class Chaos:
    cluster: NebulaCluster
    load: LoadGenerator
    rows: list[FaultRow]
    windows: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of every fault, to tell the quiet time in between."""

    @property
    def etcd(self) -> EtcdServer | EtcdCluster:
        return self.cluster.etcd

    def not_ready(self) -> str:
        """Why the system is not fully ready; empty when it is."""
        c = self.cluster
        down = [s for s in c.services() if c.pid(s) is None]
        if down:
            return f"not running: {down}"
        members = self.etcd.members if isinstance(self.etcd, EtcdCluster) else [self.etcd]
        if not all(m.running for m in members):
            return "an etcd member is down"
        try:
            if probes.leader(c) is None:
                return "no scheduler leads"
            leases = {n: probes.node_lease(c, n) for n in probes.nodes(c)}
            if None in leases.values():
                return f"node records: {leases}"
            records = probes.instance_records(c, MODEL)
        except OSError as e:
            return f"etcd: {e}"
        phases = {i: st["phase"] for i, (st, _) in records.items()}
        if len(phases) != REPLICAS or set(phases.values()) != {"ready"}:
            return f"instances: {phases}"
        # Records a dead agent left (under its old lease) vanish when that lease expires: only those written by
        # the node's current agent, under the lease of its node record, count.
        stale = [i for i, (st, lease) in records.items() if lease != leases.get(st["node"])]
        if stale:
            return f"instance records not yet rewritten by their node's agent: {stale}"
        health = probes.gateway_health(c)
        if health is None or health.get("ready_replicas", 0) < REPLICAS:
            return f"gateway: {health}"
        if not probes.chat_ok(c, MODEL):
            return "a chat request failed"
        return ""

    def wait_ready(self, timeout_s: float) -> float:
        """Wait until fully ready; the time it took."""
        start = time.monotonic()
        why = "?"
        while time.monotonic() - start < timeout_s:
            why = self.not_ready()
            if not why:
                return time.monotonic() - start
            time.sleep(0.5)
        raise AssertionError(f"not fully ready {timeout_s:.0f} s after the fault: {why}\n{self.cluster.logs()}")

    @contextmanager
    def fault(self, name: str, *, ready_timeout_s: float = 120.0) -> Iterator[Measure]:
        """Measure one fault: the caller injects it in the block (after `m.start()`), then this waits until
        fully ready, lets overlapping requests end, and records the figures in a row (also on failure)."""
        self.wait_ready(ready_timeout_s)  # the previous fault is over
        before = probes.engines(self.cluster)
        row = FaultRow(name)
        self.rows.append(row)
        m = Measure(row=row, t0=time.monotonic())
        try:
            yield m
            self.wait_ready(ready_timeout_s)
            row.recovery_s = time.monotonic() - m.t0
        finally:
            time.sleep(SETTLE_S)
            m.t1 = time.monotonic()
            self.windows.append((m.t0, m.t1))
            m.outcomes = list(self.load.between(m.t0, m.t1))
            row.count(m.outcomes)
            after = probes.engines(self.cluster)
            m.restarted = probes.engine_restarts(before, after)
            row.engine_restarts = len(m.restarted)
            m.orphans = [f"{p.pid} {p.cmdline[:80]}" for p in probes.orphans(self.cluster)]
            row.orphans = len(m.orphans)

    def quiet_outcomes(self) -> list[Outcome]:
        """Requests that ended outside every fault's window."""
        return [o for o in self.load.outcomes if not any(a <= o.ended < b for a, b in self.windows)]


@dataclass
class Measure:
    row: FaultRow
    t0: float
    t1: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    restarted: set[str] = field(default_factory=set)
    orphans: list[str] = field(default_factory=list)

    def start(self) -> None:
        """The fault is injected now (after whatever preparation the block did)."""
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        self.row.notes.append(text)

    @property
    def failed_chats(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.stream and not o.ok]

    @property
    def failed_streams(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.stream and not o.ok and not o.cut]

    @property
    def cut_streams(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.cut]
