"""What `nebula status` adds for rolling replaces and drains: each node's drain state (draining while it still
holds placements, then drained) and each model's rollout line ('rolling 1/2 (waiting for m:2)', 'rolled back:
why'), read from /nebula/drains/ and /nebula/status/rollouts/."""

from __future__ import annotations

from typing import Any

from nebula.core import keys, records
from nebula.core.store import Store
from nebula.services.gateway.records import decoded


async def annotate(store: Store, status: dict[str, Any]) -> None:
    """Add `drain` to drained nodes and `rollout` to updated models of a /v1/admin/status answer, in place."""
    drains = {d.node: d for d in decoded(records.DRAINS, (await store.list_prefix(keys.DRAINS)).items)}
    rollouts = {s.model: s for s in decoded(records.ROLLOUT_STATUS,
                                            (await store.list_prefix(keys.ROLLOUT_STATUS)).items)}
    # Only where there is one: the answer's shape is unchanged for a fleet that never drained or updated.
    for n in status.get("nodes") or []:
        if n["name"] in drains:
            n["drain"] = "draining" if n.get("placements") else "drained"
    for m in status.get("models") or []:
        if m["name"] in rollouts:
            m["rollout"] = rollouts[m["name"]].text()
