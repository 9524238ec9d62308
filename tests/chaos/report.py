"""The chaos suite's figures: one row per fault, printed as a table at the end of the run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from tests.chaos.load import Outcome


@dataclass
class FaultRow:
    fault: str
    chats_ok: int = 0
    chats_failed: int = 0
    streams_ok: int = 0
    streams_cut: int = 0
    streams_failed: int = 0
    engine_restarts: int = 0
    recovery_s: float | None = None
    """From the fault to fully ready again: services back, every replica ready, a request answered."""
    orphans: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, outcomes: Sequence[Outcome]) -> None:
        for o in outcomes:
            if not o.stream:
                self.chats_ok += o.ok
                self.chats_failed += not o.ok
            elif o.ok:
                self.streams_ok += 1
            elif o.cut:
                self.streams_cut += 1
            else:
                self.streams_failed += 1


REPORT = pytest.StashKey[list[FaultRow]]()

_HEADER = ("fault", "chat ok", "chat failed", "streams ok", "cut", "stream failed", "engine restarts",
           "ready again", "orphans", "GPU mem leaked")


def format_table(rows: Sequence[FaultRow]) -> list[str]:
    cells = [_HEADER] + [
        (r.fault, str(r.chats_ok), str(r.chats_failed), str(r.streams_ok), str(r.streams_cut), str(r.streams_failed),
         str(r.engine_restarts), "-" if r.recovery_s is None else f"{r.recovery_s:.1f} s", str(r.orphans),
         "n/a (no GPU)")
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        for note in r.notes:
            lines.append(f"  {r.fault}: {note}")
    return lines
