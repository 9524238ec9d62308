"""Logging for every Nebula process: the journal under systemd, readable text on stderr elsewhere.

Structured fields travel as `extra={"NEBULA_INSTANCE": ..., "NEBULA_MODEL": ...}`. Journal field names
must be upper case: JournalHandler forwards every record attribute named as journald allows (upper case
letters, digits, '_'), and journald drops any other name, so only upper-case extras reach
`journalctl -o json`.
"""

from __future__ import annotations

import logging
import sys
import syslog
import threading
from collections.abc import Mapping

from nebula.adapters.journal import FIELD_NAME, JournalSender

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


_PRIORITIES = ((logging.CRITICAL, syslog.LOG_CRIT), (logging.ERROR, syslog.LOG_ERR),
               (logging.WARNING, syslog.LOG_WARNING), (logging.INFO, syslog.LOG_INFO))


def journal_fields(record: logging.LogRecord, message: str, identifier: str, service: str) -> dict[str, str]:
    """The journal entry of `record` (`message`: its formatted text, traceback included): the fields
    journalctl shows and filters by, then each record attribute named as journald allows (the NEBULA_* extras)."""
    priority = next((p for level, p in _PRIORITIES if record.levelno >= level), syslog.LOG_DEBUG)
    fields = {"MESSAGE": message, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": identifier,
              "NEBULA_SERVICE": service, "LOGGER": record.name, "CODE_FILE": record.pathname,
              "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName,
              "THREAD_NAME": record.threadName or str(threading.get_ident())}
    for name, value in record.__dict__.items():
        if FIELD_NAME.fullmatch(name) and name not in fields:
            fields[name] = str(value)
    return fields


class JournalHandler(logging.Handler):
    """Each record as one structured journal entry (nebula/adapters/journal.py)."""

    def __init__(self, service: str, sender: JournalSender) -> None:
        super().__init__()
        self._service = service
        self._identifier = f"nebula-{service}"
        self._sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sender.send(journal_fields(record, self.format(record), self._identifier, self._service))
        except Exception:  # logging's own rule: a failed emit is reported on stderr, never raised
            self.handleError(record)


def _journal_handler(service: str) -> logging.Handler:
    try:
        return JournalHandler(service, JournalSender())
    except OSError as e:  # no libsystemd.so.0: stderr reaches the journal too, as plain lines
        handler = _stderr_handler()
        handler.handle(logging.makeLogRecord({"msg": f"logging as text: cannot load libsystemd ({e})",
                                              "levelno": logging.WARNING, "levelname": "WARNING"}))
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
