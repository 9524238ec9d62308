"""Engines' log lines, pure: which units and files hold a model's engine logs (what `nebula logs` reads),
one journal entry (`journalctl -o json`) or log-file line decoded into a `LogLine`, the bounds one tail may
cost, the agent's log credential and its check, and the port a node agent's log reader implements.

Engine logs can hold prompts (vLLM logs requests at some levels), so an agent serves them only to a caller
presenting its log token (`LogAccess`, published under its own key and lease: /nebula/log-access/<node>),
and the gateway only to an admin session of its console.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from nebula.core.fields import expect_field, validate_name
from nebula.core.model import REPLICA_SEP
from nebula.errors import ValidationError

# What one tail may cost an agent: the backlog it starts with, the bytes of one message (the rest is cut, and
# says so), and how many tails one agent serves at once (each is a journalctl or a file poll).
DEFAULT_BACKLOG = 200
MAX_BACKLOG = 1000
MAX_MESSAGE_BYTES = 4096
MAX_TAILS = 4
# A raw journal entry longer than this is not read into memory (journalctl prints big fields as null anyway).
MAX_RAW_LINE = 64 * 1024
CUT = " …[cut]"

# syslog priorities, as the journal's PRIORITY field holds them
ERR, WARNING, INFO = 3, 4, 6
_TEXT_LEVEL = re.compile(r"\b(CRITICAL|ERROR|WARNING|WARN|INFO|DEBUG)\b")
_LEVELS = {"CRITICAL": 2, "ERROR": ERR, "WARNING": WARNING, "WARN": WARNING, "INFO": INFO, "DEBUG": 7}
_ENGINE_UNIT = re.compile(r"^nebula-engine@(.+)\.service$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,128}$")


@dataclass(frozen=True)
class LogLine:
    time_s: float  # wall clock, seconds since the epoch
    instance: str
    priority: int  # 0 (emergency) .. 7 (debug), syslog's
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.time_s, "instance": self.instance, "priority": self.priority, "message": self.message}

    @staticmethod
    def from_dict(obj: object) -> LogLine:
        """One line as an agent sends it; raises ValidationError on anything else."""
        if not isinstance(obj, dict):
            raise ValidationError("", "a log line must be a JSON object")
        t = expect_field(obj, "t", (int, float))
        priority = expect_field(obj, "priority", int)
        if not 0 <= priority <= 7:
            raise ValidationError("priority", "must be 0 to 7")
        return LogLine(time_s=float(t), instance=expect_field(obj, "instance", str), priority=priority,
                       message=clip(expect_field(obj, "message", str)))


def engine_units(model: str) -> list[str]:
    """The units of every replica of `model`: replica 0 is nebula-engine@<model>, the others @<model>:<n>."""
    return [f"nebula-engine@{model}.service", f"nebula-engine@{model}{REPLICA_SEP}*.service"]


# The slice systemd puts every nebula-engine@ unit in: a journal match that also holds the replicas started after
# a tail opened (journalctl expands a `-u` glob once, when it starts).
ENGINE_SLICE = "system-nebula\\x2dengine.slice"


def instance_of_unit(unit: str) -> str:
    found = _ENGINE_UNIT.match(unit)
    return found.group(1) if found else ""


def is_model_instance(instance: str, model: str) -> bool:
    """Whether `instance` (a unit's instance, a log file's stem: <instance>.log) is a replica of `model`."""
    return instance == model or instance.startswith(model + REPLICA_SEP)


def clip(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut to at most `limit` UTF-8 bytes (on a character boundary), marked when cut."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return message
    return raw[:limit - len(CUT.encode())].decode("utf-8", "ignore") + CUT


def text_priority(message: str, default: int = INFO) -> int:
    """The level a text line names near its start (vLLM's `ERROR 05-12 ...`, Nebula's `... WARNING logger:`)."""
    found = _TEXT_LEVEL.search(message[:48])
    return _LEVELS[found.group(1)] if found else default


def _field_text(value: object) -> str | None:
    """A journal field as journalctl -o json writes it: a string, an array of bytes (not UTF-8), or null (too big)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, list):  # the field given twice: journalctl lists the values
        texts = [t for v in value if (t := _field_text(v)) is not None]
        return texts[-1] if texts else None
    return None


def decode_journal_entry(raw: bytes | str) -> LogLine | None:
    """One line of `journalctl -o json` as a LogLine, or None for anything that is not an entry of an engine."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict):
        return None
    unit = _field_text(entry.get("_SYSTEMD_UNIT")) or _field_text(entry.get("UNIT")) or ""
    instance = _field_text(entry.get("NEBULA_INSTANCE")) or instance_of_unit(unit)
    message = _field_text(entry.get("MESSAGE"))
    if message is None:
        message = "[a message too large for the journal's JSON]" if "MESSAGE" in entry else ""
    try:
        time_s = int(str(entry.get("__REALTIME_TIMESTAMP"))) / 1e6
    except ValueError:
        return None
    priority_text = _field_text(entry.get("PRIORITY")) or ""
    priority = int(priority_text) if priority_text.isdigit() and int(priority_text) <= 7 else INFO
    if priority == INFO:  # a stream line (vLLM's stdout) is INFO whatever it says: read its own level
        priority = text_priority(message)
    return LogLine(time_s=time_s, instance=instance, priority=priority, message=clip(message.rstrip("\n")))


def journal_cursor(raw: bytes | str) -> str:
    """The __CURSOR of one `journalctl -o json` line ("" for anything else): where to follow on from."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        return ""
    cursor = entry.get("__CURSOR") if isinstance(entry, dict) else None
    return cursor if isinstance(cursor, str) else ""


def decode_text_line(raw: bytes, instance: str, time_s: float) -> LogLine:
    """One line of an engine's log file (no systemd): its time is when it was read."""
    message = raw.rstrip(b"\r\n").decode("utf-8", "replace")
    return LogLine(time_s=time_s, instance=instance, priority=text_priority(message), message=clip(message))


class LineSplitter:
    """Bytes in, complete lines out, holding at most `limit` bytes: a longer line is cut to `limit` and its rest
    dropped up to its newline (so one runaway line costs a bounded buffer, never the reader)."""

    def __init__(self, limit: int = MAX_RAW_LINE) -> None:
        self._limit = limit
        self._buf = b""
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self._limit:
                    if not self._skipping:
                        out.append(self._buf[:self._limit])
                    self._buf, self._skipping = b"", True
                return out
            line, self._buf = self._buf[:end], self._buf[end + 1:]
            if self._skipping:
                self._skipping = False
            else:
                out.append(line[:self._limit])


def backlog_lines(text: bytes, lines: int) -> list[bytes]:
    """The last `lines` complete lines of `text` (a file's tail)."""
    whole = text.split(b"\n")[:-1]  # after the last newline: a line still being written
    return whole[-lines:] if lines > 0 else []


def requested_backlog(value: str | None) -> int:
    """The `lines` query parameter: DEFAULT_BACKLOG when absent, clamped to 0..MAX_BACKLOG; ValueError if not
    a number."""
    if value is None or value == "":
        return DEFAULT_BACKLOG
    return max(0, min(MAX_BACKLOG, int(value)))


# --- the agent's log credential ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LogAccess:
    """Where a node agent serves its engines' logs and the token it asks for; under the agent's lease at
    /nebula/log-access/<node>, a key of its own (no listing of nodes or services shows it)."""

    node: str
    address: str  # host:port
    token: str
    scheme: str = "http"

    @staticmethod
    def from_dict(obj: object) -> LogAccess:
        if not isinstance(obj, dict):
            raise ValidationError("", "log access record must be a JSON object")
        address = expect_field(obj, "address", str)
        if not address or "/" in address or "@" in address:
            raise ValidationError("address", "must be host:port")
        token = expect_field(obj, "token", str)
        if not _TOKEN.fullmatch(token):
            raise ValidationError("token", "must be 32 to 128 URL-safe characters")
        scheme = expect_field(obj, "scheme", str, "http")
        if scheme not in ("http", "https"):
            raise ValidationError("scheme", "must be 'http' or 'https'")
        return LogAccess(node=validate_name(expect_field(obj, "node", str), "node"), address=address, token=token,
                         scheme=scheme)

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "address": self.address, "token": self.token, "scheme": self.scheme}

    def __repr__(self) -> str:  # never in a log line or a traceback
        return f"LogAccess(node={self.node!r}, address={self.address!r}, scheme={self.scheme!r})"


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries `token` as its Bearer credential; compared in constant time."""
    if not authorization or not token:
        return False
    kind, _, presented = authorization.partition(" ")
    return kind.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


# --- the port a node agent reads its engines' logs through ---------------------------------------------------

class LogSourceError(Exception):
    """The logs could not be followed (journalctl missing or refused, the log directory unreadable)."""


class EngineLogSource(Protocol):
    def tail(self, model: str, backlog: int) -> AbstractAsyncContextManager[AsyncIterator[LogLine]]:
        """`model`'s engine lines on this node: the last `backlog`, then new ones as they come, until the block
        ends (which ends the reader: no process or file is left behind)."""
        ...

