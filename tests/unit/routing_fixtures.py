"""Builders of instance statuses and replicas, shared by the routing tests (test_routing_pick.py,
test_routing_properties.py, test_replica_table.py)."""

from __future__ import annotations

from nebula.core.engine_load import EngineLoad
from nebula.core.model import InstanceStatus, Phase, Task
from nebula.core.routing import Replica


def status(instance: str, phase: Phase = Phase.READY, model: str = "m", port: int = 9000,
           task: Task = Task.GENERATE) -> InstanceStatus:
    return InstanceStatus(instance=instance, model=model, node="n1", phase=phase,
                          endpoint=f"http://127.0.0.1:{port}", task=task)


def rep(port: int, model: str = "m") -> Replica:
    return Replica(instance=f"{model}:{port}", model=model, endpoint=f"http://127.0.0.1:{port}",
                   task=Task.GENERATE)


NO_LOADS: dict[str, EngineLoad] = {}
