"""Log records as journal entries: the fields each record becomes (pure), the sender's refusal of a name
journald would silently drop, and the host's libsystemd really loaded and called. That journald stores the
entries with their fields is tested in a real systemd: tests/integration/test_systemd_units.py
(test_supervisor_logs_structured_fields_to_the_journal) and test_log_shipping.py."""

from __future__ import annotations

import logging
import sys

import pytest

from nebula.adapters.journal import JournalSender
from nebula.services.logsetup import JournalHandler, journal_fields


def record(level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    rec = logging.getLogger("nebula.test").makeRecord("nebula.test", level, "/src/x.py", 12, "hello %s",
                                                       ("there",), None, func="run", extra=extra)
    return rec


def test_a_record_becomes_the_fields_journalctl_shows_with_its_nebula_extras() -> None:
    fields = journal_fields(record(NEBULA_MODEL="qwen", NEBULA_STATUS=503, lower="dropped"), "hello there",
                            "nebula-engine", "engine")
    assert fields["MESSAGE"] == "hello there" and fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "nebula-engine" and fields["NEBULA_SERVICE"] == "engine"
    assert (fields["LOGGER"], fields["CODE_FILE"], fields["CODE_LINE"], fields["CODE_FUNC"]) == (
        "nebula.test", "/src/x.py", "12", "run")
    assert fields["NEBULA_MODEL"] == "qwen" and fields["NEBULA_STATUS"] == "503"
    assert "lower" not in fields and "LOWER" not in fields


@pytest.mark.parametrize(("level", "priority"), [(logging.DEBUG, "7"), (logging.INFO, "6"), (logging.WARNING, "4"),
                                                 (logging.ERROR, "3"), (logging.CRITICAL, "2")])
def test_levels_map_to_syslog_priorities(level: int, priority: str) -> None:
    assert journal_fields(record(level), "m", "i", "s")["PRIORITY"] == priority


class Captured(JournalSender):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, str]] = []

    def send(self, fields: dict[str, str]) -> None:  # type: ignore[override]
        self.sent.append(dict(fields))


def test_the_handler_puts_the_traceback_in_the_message() -> None:
    sender = Captured()
    handler = JournalHandler("gateway", sender)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record(logging.ERROR)
        rec.exc_info = sys.exc_info()
    handler.handle(rec)
    (fields,) = sender.sent
    assert fields["MESSAGE"].startswith("hello there\nTraceback") and "RuntimeError: boom" in fields["MESSAGE"]
    assert fields["SYSLOG_IDENTIFIER"] == "nebula-gateway"


def test_the_sender_refuses_a_name_journald_would_drop() -> None:
    sender = JournalSender()
    for name in ("lower", "_TRUSTED", "9LIVES", "X" * 65, "WITH-DASH"):
        with pytest.raises(ValueError, match="not a journal field name"):
            sender.send({"MESSAGE": "m", name: "v"})


def test_the_hosts_libsystemd_is_called() -> None:
    # With no journald listening (this machine), sd_journal_sendv reports success without sending; the call
    # itself crossing into the real library, with newlines and non-ASCII in values, is what this proves.
    JournalSender().send({"MESSAGE": "line one\nline two ✓", "PRIORITY": "6", "NEBULA_MODEL": "m"})
    with pytest.raises(OSError):
        JournalSender("libsystemd-does-not-exist.so.0")
