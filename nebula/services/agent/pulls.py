"""The agent's side of `nebula pull`: fetch each of this node's pull intents and report their progress."""

from __future__ import annotations

import logging

from nebula.core.pulls import PullIntent, PullPhase, PullStatus
from nebula.services.agent.sources import Broken, ModelSources, Ready
from nebula.services.cluster.mirror import MirrorState
from nebula.services.cluster.writes import ClusterWrites

log = logging.getLogger("nebula.agent")


class PullWorker:
    def __init__(self, node: str, writes: ClusterWrites, sources: ModelSources) -> None:
        self.node = node
        self.writes = writes
        self.sources = sources
        self.intents: dict[str, PullIntent] = {}
        self._reported: dict[str, PullStatus] = {}

    def on_pulls(self, state: MirrorState[PullIntent]) -> None:
        """The pulls mirror's callback: the full set of this node's pull intents."""
        self.intents = {p.id: p for p in state.records.values()}

    def source_ids(self) -> set[str]:
        return {p.source_id for p in self.intents.values()}

    def forget_reports(self) -> None:
        """A new lease dropped every status key: write them all again."""
        self._reported.clear()

    async def step(self, lease: int) -> None:
        statuses = {pid: self._status(p) for pid, p in self.intents.items()}
        for pid, st in statuses.items():
            if self._reported.get(pid) != st:
                await self.writes.report_pull(st, lease)
                self._reported[pid] = st
        for pid in [p for p in self._reported if p not in statuses]:
            await self.writes.forget_pull(self.node, pid)
            del self._reported[pid]

    def _status(self, p: PullIntent) -> PullStatus:
        res = self.sources.resolve(p.source, p.revision)
        if isinstance(res, Ready):
            phase, message, progress = PullPhase.READY, res.path, 1.0
        elif isinstance(res, Broken):
            phase, message, progress = PullPhase.FAILED, res.message, None
        else:
            phase, message, progress = PullPhase.DOWNLOADING, res.message, res.progress
        return PullStatus(id=p.id, node=self.node, source=p.source_id, phase=phase, message=message, progress=progress)
