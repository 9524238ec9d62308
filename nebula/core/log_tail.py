"""The console's live tail of a model's engine logs across nodes, pure: which nodes' tails to open (or open
again) now, and the nodes' starting lines merged into one, each tagged with its node."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from nebula.core.engine_logs import LogLine

# A node whose tail failed is tried again after this, from its new lines only (its backlog was shown).
RETRY_S = 30.0


@dataclass(frozen=True)
class Opening:
    node: str
    backlog: bool  # False: a tail opened again, new lines only


def tails_to_open(wanted: Collection[str], running: Collection[str], failed: Mapping[str, float], now: float,
                  retry_s: float = RETRY_S) -> list[Opening]:
    """The tails to open: a node that runs the model and has none, unless it failed within `retry_s`; a node
    that failed before starts again without its backlog. Sorted by node."""
    out = []
    for node in sorted(set(wanted) - set(running)):
        at = failed.get(node)
        if at is None:
            out.append(Opening(node, backlog=True))
        elif now - at >= retry_s:
            out.append(Opening(node, backlog=False))
    return out


def tagged(node: str, line: LogLine) -> dict[str, Any]:
    """A line as the console's stream sends it: tagged with its node."""
    return {"node": node} | line.to_dict()


def merge_backlogs(backlogs: Mapping[str, list[LogLine]], limit: int) -> list[dict[str, Any]]:
    """Several nodes' starting lines as one, oldest first (each node's own order kept for equal times), the
    newest `limit` kept."""
    merged = sorted(((line.time_s, node, n, line) for node, lines in backlogs.items()
                     for n, line in enumerate(lines)), key=lambda t: (t[0], t[1], t[2]))
    return [tagged(node, line) for _, node, _, line in merged[-limit:]] if limit > 0 else []
