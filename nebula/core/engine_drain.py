"""When an engine whose placement was removed may stop: a pure decision, the agent's applier asks it each pass.

The agent reports such an instance DRAINING at once, so every gateway stops routing new requests to it; its
engine keeps running until (a) `notice_s` has passed (a request the gateway picked just before it saw DRAINING
still lands), and (b) the engine has no request running or waiting (streams included: a stream is one running
request until its last token), or `timeout_s` has passed since the removal. Then the unit stops (vLLM's own
SIGTERM handling aborts what is left: there is nothing left).
"""

from __future__ import annotations


def keep_draining(removed_at: float, now: float, busy: int | None, *, notice_s: float, timeout_s: float) -> bool:
    """True while the engine must keep running. `busy`: requests running or waiting on it; None when its
    /metrics could not be read (a dead or hung engine has nothing to finish)."""
    waited = now - removed_at
    if waited >= timeout_s:
        return False
    if waited < notice_s:
        return True
    return bool(busy)
