"""The gateway's mirror of /nebula/models/, for request checks and GET /v1/models (instances: replicas.py).

Inference requests are checked against this mirror (no store round trip per request, and it keeps
answering from its last view while etcd is down). The admin API reads the store itself, so it sees
its own writes at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from nebula.core.elastic import ScaleState, WakeRequest
from nebula.core.elastic_state import model_state
from nebula.core.lora import AdapterSpec
from nebula.core.model import ModelSpec, Phase
from nebula.services.cluster.mirror import MirrorState


class ClusterView:
    def __init__(self) -> None:
        self.models: dict[str, ModelSpec] = {}
        self.models_synced = False
        self.adapters: dict[str, AdapterSpec] = {}  # LoRA adapters by name (lora_routing.py)
        self.wakes: frozenset[str] = frozenset()  # models with a wake request in /nebula/wake/ (any gateway's)
        self.scale: dict[str, ScaleState] = {}  # elastic models' counts now, as the scheduler wrote them
        self.holding: Callable[[str], bool] = lambda _: False  # this process holds requests for the model (wake.py)

    def update_wakes(self, state: MirrorState[WakeRequest]) -> None:
        """The wake requests mirror's callback."""
        self.wakes = frozenset(w.model for w in state.records.values())

    def update_scale(self, state: MirrorState[ScaleState]) -> None:
        """The scale states mirror's callback."""
        self.scale = {s.model: s for s in state.records.values()}

    def desired_replicas(self, spec: ModelSpec) -> int:
        """Replicas `spec` should have now: an elastic model's count as the scheduler set it (its spec's until
        the scheduler's first word), else its spec's."""
        scale = self.scale.get(spec.name) if spec.scaling is not None else None
        return scale.replicas if scale is not None else spec.replicas

    def update_adapters(self, state: MirrorState[AdapterSpec]) -> None:
        """The adapters mirror's callback: every valid adapter record."""
        self.adapters = {a.name: a for a in state.records.values()}

    def update_models(self, state: MirrorState[ModelSpec]) -> None:
        """The models mirror's callback: every valid model spec, each under its own key (the mirror checked)."""
        self.models = {spec.name: spec for spec in state.records.values()}
        self.models_synced = True

    def model_entry(self, spec: ModelSpec, phases: Counter[Phase]) -> dict[str, Any]:
        """One entry of GET /v1/models: OpenAI's fields plus Nebula's (`phases`: of its instances); an elastic
        model's also has its `state` (idle, waking, sleeping, ready) and `scaling` policy."""
        entry = {"id": spec.name, "object": "model", "created": 0, "owned_by": "nebula",
                 "task": spec.task.value, "replicas": self.desired_replicas(spec), "ready": phases.get(Phase.READY, 0),
                 "phases": {p.value: n for p, n in sorted(phases.items())}}
        if spec.scaling is not None:
            waking = spec.name in self.wakes or self.holding(spec.name)
            entry["state"] = model_state(phases, waking).value
            entry["scaling"] = spec.scaling.to_dict()
        return entry
