"""Rolling replace and node drain: the records that carry them through etcd.

Who writes what (core/keys.py names the keys):
- `RolloutRecord` (`/nebula/rollouts/<model>`): created by the admin API in the one transaction that writes the
  model's new spec (so a second update while it exists is refused, naming it); deleted by the scheduler leader,
  fenced, once the rollout is done or rolled back;
- `RolloutStatus` (`/nebula/status/rollouts/<model>`): progress and result, written only by the scheduler leader,
  fenced; it outlives the rollout so `nebula update` and `nebula status` can say how it ended;
- `DrainRecord` (`/nebula/drains/<node>`): the node takes no new replicas and its replicas move away; written and
  deleted by the admin API (`nebula node drain` / `undrain`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from nebula.core.fields import expect_field, expect_int, expect_number, validate_name
from nebula.core.model import ModelSpec
from nebula.errors import ValidationError


@dataclass(frozen=True)
class RolloutRecord:
    """An update in progress: what the model was before (to roll back to) and what it is being moved to."""

    model: str
    previous: ModelSpec
    target: ModelSpec
    started: float
    by: str = ""
    """Who asked (the admin key's name, or 'admin'), for the 409 that names it."""

    @staticmethod
    def from_dict(obj: object) -> RolloutRecord:
        if not isinstance(obj, dict):
            raise ValidationError("", "rollout record must be a JSON object")
        model = validate_name(expect_field(obj, "model", str), "model")
        previous = ModelSpec.from_dict(expect_field(obj, "previous", dict))
        target = ModelSpec.from_dict(expect_field(obj, "target", dict))
        if previous.name != model or target.name != model:
            raise ValidationError("previous", f"the specs of a rollout of '{model}' must name '{model}'")
        return RolloutRecord(model=model, previous=previous, target=target, started=expect_number(obj, "started"),
                             by=expect_field(obj, "by", str, ""))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "previous": self.previous.to_dict(), "target": self.target.to_dict(),
                "started": self.started, "by": self.by}


class RolloutState(enum.StrEnum):
    ROLLING = "rolling"
    DONE = "done"
    ROLLED_BACK = "rolled_back"  # a new replica failed: the model's spec is the previous one again
    FAILED = "failed"  # a new replica failed and there was nothing to roll back to (a drain, a rollback's own roll)


@dataclass(frozen=True)
class RolloutStatus:
    """Where a model's rolling replace stands (`/nebula/status/rollouts/<model>`)."""

    model: str
    state: RolloutState
    target: str
    """core/rollout.engine_fingerprint of the spec being rolled to: a new update is a new rollout."""
    replaced: int = 0
    """Replicas running the target spec, READY."""
    total: int = 0
    """Replicas the model has."""
    reason: str = ""
    """Why it rolled back or failed; while rolling back, why the rollback began."""
    surge: str = ""
    """The new replica being waited for, if any."""
    surge_since: float = 0.0
    """When the scheduler placed it (wall clock): its ready timeout counts from here."""
    since: float = 0.0
    """When this rollout began."""
    updated: float = 0.0

    @staticmethod
    def from_dict(obj: object) -> RolloutStatus:
        if not isinstance(obj, dict):
            raise ValidationError("", "rollout status must be a JSON object")
        try:
            state = RolloutState(expect_field(obj, "state", str))
        except ValueError:
            raise ValidationError("state", f"must be one of {', '.join(s.value for s in RolloutState)}") from None
        return RolloutStatus(model=validate_name(expect_field(obj, "model", str), "model"), state=state,
                             target=expect_field(obj, "target", str), replaced=expect_int(obj, "replaced", 0, 1000, 0),
                             total=expect_int(obj, "total", 0, 1000, 0), reason=expect_field(obj, "reason", str, ""),
                             surge=expect_field(obj, "surge", str, ""),
                             surge_since=expect_number(obj, "surge_since", 0.0),
                             since=expect_number(obj, "since", 0.0), updated=expect_number(obj, "updated", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "state": self.state.value, "target": self.target, "replaced": self.replaced,
                "total": self.total, "reason": self.reason, "surge": self.surge, "surge_since": self.surge_since,
                "since": self.since, "updated": self.updated}

    @property
    def finished(self) -> bool:
        return self.state is not RolloutState.ROLLING

    def text(self) -> str:
        """One line for people: 'rolling 1/2 (waiting for m:2)', 'done 2/2', 'rolled back: why'."""
        if self.state is RolloutState.ROLLING:
            wait = f" (waiting for {self.surge})" if self.surge else ""
            back = f"; rolling back: {self.reason}" if self.reason else ""
            return f"rolling {self.replaced}/{self.total}{wait}{back}"
        if self.state is RolloutState.DONE:
            return f"done {self.replaced}/{self.total}"
        return f"{self.state.value.replace('_', ' ')}: {self.reason}"


@dataclass(frozen=True)
class DrainRecord:
    """A node being drained (`/nebula/drains/<node>`): placement puts nothing new there and moves its replicas."""

    node: str
    since: float
    by: str = ""
    force: bool = False
    """Drained although some model could then run nowhere (the operator said --force)."""

    @staticmethod
    def from_dict(obj: object) -> DrainRecord:
        if not isinstance(obj, dict):
            raise ValidationError("", "drain record must be a JSON object")
        return DrainRecord(node=validate_name(expect_field(obj, "node", str), "node"),
                           since=expect_number(obj, "since"), by=expect_field(obj, "by", str, ""),
                           force=expect_field(obj, "force", bool, False))

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "since": self.since, "by": self.by, "force": self.force}
