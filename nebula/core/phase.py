"""An instance's phase, derived from what the agent observes; pure so every transition is testable.

Failures are decided here too, once: whether a crashed engine gets another start (`restart_verdict`), what
one line explains it (`error_line`, the last meaningful line of the engine's output; the whole tail stays
in `nebula logs`), and the phase and message every reader shows (`observe_phase`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from nebula.core.model import Phase
from nebula.core.units import UnitState, UnitStatus

MAX_REASON_CHARS = 300

# Prefixes that differ between two runs of the same failure, stripped so equal errors compare equal:
# vLLM's process tag "(APIServer pid=123) " and its logger head "ERROR 01-31 12:00:00 [file.py:12] ".
_PROCESS_TAG = re.compile(r"^\(\w+(?: \w+)* pid=\d+\)\s*")
_VLLM_LOG_HEAD = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\]\s*")
# Nebula's own log lines (the supervisor's epilogue, "engine exited unexpectedly with status 1"): they say
# that the engine failed, never why, so they explain a failure only when nothing else does.
_NEBULA_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \w+ nebula[.\w]*: (?P<message>.*?)(?: NEBULA_\w+=.*)?$")
# The last line of a Python traceback: "ValueError: ...", "torch.OutOfMemoryError: ...", "KeyboardInterrupt".
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::\s*(?P<text>.*))?$")
# argparse's refusal of a command line ("vllm serve: error: argument --dtype: invalid choice: ..."), exit status 2.
_USAGE_ERROR = re.compile(r"^[\w.-]+(?: [\w.-]+)*: error: (?P<text>.+)$")
# pydantic (vLLM's config classes) puts the real message on the line after "ValidationError: 1 validation error".
_PYDANTIC_DETAIL = re.compile(r"^\s*Value error, (?P<text>.*?)(?: \[type=.*)?$")
# Wrappers that point elsewhere ("Engine core initialization failed. See root cause above."): the root cause
# is an earlier exception line.
_POINTS_ELSEWHERE = re.compile(r"see (?:the )?root cause above|see (?:the )?(?:error|stack trace|logs?) above", re.I)


def error_line(lines: Sequence[str]) -> str:
    """The one line that best says why an engine failed, from the last lines of its output (oldest first).

    The last exception line of a traceback wins (pydantic's detail line when vLLM's config refused a value),
    skipping wrappers that only point at an earlier root cause, as does argparse's refusal of the command line;
    else Nebula's own last error line; else the last line. Run-specific prefixes (pids, timestamps) are
    stripped, so the same failure gives the same line.
    """
    cleaned = [_strip(line) for line in lines if line.strip()]
    fallback = ""
    for i in range(len(cleaned) - 1, -1, -1):
        line = cleaned[i]
        own = _NEBULA_LOG.match(line)
        if own is not None:
            fallback = fallback or own["message"]
            continue
        if _USAGE_ERROR.match(line) is not None:
            return _shorten(line)
        m = _EXCEPTION.match(line)
        if m is None or _POINTS_ELSEWHERE.search(line):
            continue
        if "ValidationError" in line and i + 1 < len(cleaned):
            detail = _PYDANTIC_DETAIL.match(cleaned[i + 1])
            if detail is not None:
                return _shorten(f"ValueError: {detail['text']}")
        return _shorten(line)
    if fallback:
        return _shorten(fallback)
    return _shorten(cleaned[-1]) if cleaned else ""


def _strip(line: str) -> str:
    line = _PROCESS_TAG.sub("", line.rstrip())
    return _VLLM_LOG_HEAD.sub("", line)


def _shorten(line: str) -> str:
    line = " ".join(line.split())
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 3] + "..."


def repeated(errors: Sequence[str]) -> bool:
    """Whether the last two failures said the same thing: a deterministic failure (a bad argument, a model
    vLLM cannot load) that another start would only repeat."""
    return len(errors) >= 2 and bool(errors[-1]) and errors[-1] == errors[-2]


@dataclass(frozen=True)
class Failures:
    """What the agent knows of an instance's engine failures since it last started afresh."""

    restarts: int = 0
    """Restarts made: the one count every message and the instance record carry (the agent's own book in
    process mode, systemd's NRestarts under systemd)."""
    errors: tuple[str, ...] = ()
    """The `error_line` of each failure seen, oldest first."""
    restarting: bool = False
    """The agent will start it again (`restart_verdict`)."""
    stopped: bool = False
    """The agent stopped it between two of its service manager's restarts: the same error twice."""


def restart_verdict(errors: Sequence[str], *, agent_restarts: bool, budget_left: bool) -> bool:
    """Whether a crashed engine gets another start from the agent: only where no service manager restarts it
    (process mode), while the restart policy's budget lasts, and not after the same error twice."""
    return agent_restarts and budget_left and not repeated(errors)


def observe_phase(*, blocked: str | None, unit: UnitStatus | None, healthy: bool,
                  downloading: bool = False, failures: Failures = Failures()) -> tuple[Phase, str]:
    """(phase, message) of a placed instance; the message is one line.

    `blocked` is why it cannot start at all (e.g. its source path does not exist); `healthy` is whether its
    engine answered /health on the last check; `failures` what its engine's failures were.
    """
    if blocked is not None:
        return Phase.FAILED, blocked
    if downloading:
        return Phase.DOWNLOADING, "fetching model files"
    if failures.stopped:
        return Phase.FAILED, f"{failures.errors[-1] if failures.errors else 'engine failed'} (the same error twice: " \
                             "not restarted)"
    if unit is None or unit.state is UnitState.INACTIVE:
        return Phase.PENDING, "waiting to start"
    if unit.state is UnitState.FAILED:
        return _failed_phase(unit, failures)
    if unit.state is UnitState.DEACTIVATING:
        return Phase.DRAINING, "stopping"
    if unit.state is UnitState.ACTIVE and healthy:
        return Phase.READY, ""
    if unit.state is UnitState.ACTIVE:
        return Phase.STARTING, "engine not answering /health yet"
    if between_restarts(unit):
        why = f": {failures.errors[-1]}" if failures.errors else ""
        return Phase.STARTING, f"engine exited ({unit.result or 'failed'}){why}; systemd restarts it " \
                               f"({failures.restarts} so far)"
    return Phase.STARTING, "loading model"


def between_restarts(unit: UnitStatus) -> bool:
    """systemd's state between a failure and the restart its Restart= makes (`auto-restart`; systemd 254+ also
    `auto-restart-queued`): a failure the agent sees although the unit never shows `failed`."""
    return unit.state is UnitState.ACTIVATING and unit.sub_state.startswith("auto-restart")


def _failed_phase(unit: UnitStatus, failures: Failures) -> tuple[Phase, str]:
    error = failures.errors[-1] if failures.errors else ""
    exited = unit.result or "failed"
    if failures.restarting:
        why = f": {error}" if error else ""
        return Phase.STARTING, f"engine exited ({exited}){why}; restarting ({failures.restarts} so far)"
    if repeated(failures.errors):
        return Phase.FAILED, f"{error} (the same error twice: not restarted)"
    why = f": {error}" if error else ""
    return Phase.FAILED, f"engine unit failed ({exited}) after {failures.restarts} restart(s){why}"
