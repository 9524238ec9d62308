"""`nebula load`'s elastic-capacity flags (--min-replicas, --max-replicas, --idle-unload, --idle-action,
--sleep-level, --priority, --target-inflight) as the load request's `scaling` object. The bounds themselves
are checked by the admin API (core/elastic.py ScalingPolicy), whose one-line error the CLI prints."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from nebula.cli.client import EXIT_USAGE, CliError

_DURATION = re.compile(r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str, flag: str = "--idle-unload") -> float:
    """`90`, `90s`, `10m`, `1h30m`, `1.5h` -> seconds; a usage error naming the flag otherwise."""
    m = _DURATION.fullmatch(text.strip())
    if not text.strip() or m is None or not any(m.groupdict().values()):
        raise CliError(f"{flag} {text!r}: give a duration such as 90s, 10m or 1h30m", EXIT_USAGE)
    seconds = sum(float(m[u]) * mult for u, mult in (("h", 3600), ("m", 60), ("s", 1)) if m[u])
    if not math.isfinite(seconds) or seconds <= 0:
        raise CliError(f"{flag} {text!r}: must be more than 0", EXIT_USAGE)
    return seconds


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("elastic capacity (the scheduler sets the count within the bounds)")
    g.add_argument("--min-replicas", type=int, help="fewest replicas; 0 lets an idle model unload "
                   "(needs --idle-unload)")
    g.add_argument("--max-replicas", type=int, help="most replicas autoscaling may add")
    g.add_argument("--idle-unload", metavar="DURATION", help="unload (or sleep) after this long without an "
                   "inference request, e.g. 10m; with no --min-replicas it means --min-replicas 0")
    g.add_argument("--idle-action", choices=["stop", "sleep"], help="what an idle model does: stop its engines, "
                   "or sleep (vLLM's sleep mode, GPU only); default: the fleet's ([scheduler] idle_action)")
    g.add_argument("--sleep-level", type=int, choices=[1, 2], help="vLLM sleep level: 1 keeps the weights in "
                   "host memory, 2 discards them (frees the GPU for others)")
    g.add_argument("--priority", type=int, help="when GPUs run out, a model of higher priority may evict an idle "
                   "one of lower priority (default 0)")
    g.add_argument("--target-inflight", type=float, help="requests in flight or queued per replica that "
                   "autoscaling aims at (default: [scheduler] target_inflight)")


def scaling_request(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `scaling` object of the load request, or None when no elastic flag was given (a fixed count)."""
    out: dict[str, Any] = {}
    for key in ("min_replicas", "max_replicas", "idle_action", "sleep_level", "priority", "target_inflight"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    if getattr(args, "idle_unload", None) is not None:
        out["idle_unload_s"] = parse_duration(args.idle_unload)
    return out or None


def default_replicas(scaling: dict[str, Any] | None) -> int:
    """The count a fresh elastic load starts at when --replicas is not given: its minimum, at least 1."""
    return max(1, int((scaling or {}).get("min_replicas") or 1))
