"""Logging for every Nebula process: the journal under systemd, readable text on stderr elsewhere.

Structured fields travel as `extra={"NEBULA_INSTANCE": ..., "NEBULA_MODEL": ...}`. Journal field names
must be upper case: systemd-python's JournalHandler forwards every record attribute as a field, and
journald silently drops names with lower-case letters, so only upper-case extras reach `journalctl -o json`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

FIELD_PREFIX = "NEBULA_"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class KeyValueFormatter(logging.Formatter):
    """`time level logger: message KEY=value ...`, with the record's NEBULA_* extras appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = sorted((k, v) for k, v in record.__dict__.items() if k.startswith(FIELD_PREFIX))
        if not fields:
            return text
        return text + " " + " ".join(f"{k}={_quote(v)}" for k, v in fields)


def _quote(value: object) -> str:
    text = str(value)
    return repr(text) if (not text or any(c.isspace() or c in "\"'=" for c in text)) else text


def _journal_handler(service: str) -> logging.Handler:
    # Imported lazily: systemd-python needs libsystemd, and only processes run by systemd use it.
    from systemd.journal import JournalHandler

    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=f"nebula-{service}",
                                              NEBULA_SERVICE=service)
    return handler


def setup_logging(service: str, level: str, env: Mapping[str, str]) -> None:
    """Configure the root logger for `service` (gateway, scheduler, node, engine).

    $JOURNAL_STREAM is set by systemd when stdout/stderr go to the journal: then log natively to
    journald so extras become fields; otherwise write text to stderr.
    """
    handler = _journal_handler(service) if env.get("JOURNAL_STREAM") else _stderr_handler()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    return handler
