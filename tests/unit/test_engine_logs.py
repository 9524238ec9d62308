"""Engine log lines, pure (core/engine_logs.py, core/log_tail.py): a journal entry as `journalctl -o json` prints
it decoded into a line (garbage is no line, never an error), the level a text line names, the bounds one tail
may cost, the agent's log token and its check, which nodes' tails the console opens, and the nodes' backlogs
merged into one, each line tagged with its node."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core import keys, records
from nebula.core.engine_logs import (
    CUT,
    DEFAULT_BACKLOG,
    ERR,
    INFO,
    MAX_BACKLOG,
    WARNING,
    LineSplitter,
    LogAccess,
    LogLine,
    backlog_lines,
    bearer_matches,
    clip,
    decode_journal_entry,
    decode_text_line,
    engine_units,
    instance_of_unit,
    is_model_instance,
    requested_backlog,
    text_priority,
)
from nebula.core.log_tail import Opening, merge_backlogs, tails_to_open
from nebula.core.model import dumps
from nebula.errors import ValidationError

TOKEN = "A" * 43


def entry(**fields: object) -> bytes:
    base: dict[str, object] = {"__REALTIME_TIMESTAMP": "1700000000250000",
                               "_SYSTEMD_UNIT": "nebula-engine@tiny:1.service", "PRIORITY": "6",
                               "MESSAGE": "INFO 05-12 10:00:00 [api_server.py:1] serving"}
    return json.dumps(base | fields).encode()


def test_a_journal_entry_becomes_a_line_of_its_instance() -> None:
    assert decode_journal_entry(entry()) == LogLine(time_s=1700000000.25, instance="tiny:1", priority=INFO,
                                                    message="INFO 05-12 10:00:00 [api_server.py:1] serving")
    # The supervisor's own entries name their instance; journald's priority wins over the text's.
    line = decode_journal_entry(entry(NEBULA_INSTANCE="tiny", PRIORITY="3", MESSAGE="cannot start engine"))
    assert line is not None and (line.instance, line.priority) == ("tiny", ERR)
    # A stream line (vLLM's stdout) is INFO to journald: its own level decides.
    line = decode_journal_entry(entry(MESSAGE="ERROR 05-12 10:00:01 [engine.py:9] CUDA out of memory\n"))
    assert line is not None and line.priority == ERR and line.message.endswith("memory")


def test_journal_fields_in_their_other_shapes() -> None:
    line = decode_journal_entry(entry(MESSAGE=list(b"caf\xe9 WARNING x")))  # not UTF-8: an array of bytes
    assert line is not None and line.message == "caf\ufffd WARNING x" and line.priority == WARNING
    line = decode_journal_entry(entry(MESSAGE=None))  # larger than journalctl prints
    assert line is not None and "too large" in line.message
    line = decode_journal_entry(entry(MESSAGE=["one", "two"], PRIORITY="99"))  # given twice; a nonsense priority
    assert line is not None and line.message == "two" and line.priority == INFO
    line = decode_journal_entry(entry(_SYSTEMD_UNIT=None, UNIT="nebula-engine@tiny.service", MESSAGE="Started."))
    assert line is not None and line.instance == "tiny"


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"', b"{", b"[" * 100_000,
                                 entry(__REALTIME_TIMESTAMP="soon"), entry(__REALTIME_TIMESTAMP=None)])
def test_garbage_is_no_line(raw: bytes) -> None:
    assert decode_journal_entry(raw) is None


@given(st.binary(max_size=200))
def test_any_bytes_are_a_line_or_none(raw: bytes) -> None:
    line = decode_journal_entry(raw)
    assert line is None or isinstance(line, LogLine)


def test_levels_named_by_text_lines_and_the_units_and_files_of_a_model() -> None:
    assert text_priority("2025-01-01 10:00:00,1 WARNING nebula.engine: slow") == WARNING
    assert text_priority("Received request chatcmpl-1: prompt: 'why does my code print ERROR'") == INFO, \
        "a level word past where levels are written (a prompt's) is not the line's level"
    assert decode_text_line(b"ERROR 05-12 boom\r\n", "tiny:2", 5.0) == LogLine(5.0, "tiny:2", ERR, "ERROR 05-12 boom")
    assert engine_units("tiny") == ["nebula-engine@tiny.service", "nebula-engine@tiny:*.service"]
    assert instance_of_unit("nebula-engine@tiny:3.service") == "tiny:3" and instance_of_unit("sshd.service") == ""
    assert is_model_instance("tiny", "tiny") and is_model_instance("tiny:1", "tiny")
    assert not is_model_instance("tinyllama", "tiny")


def test_bounds_of_one_tail() -> None:
    assert clip("é" * 3000) == "é" * ((4096 - len(CUT.encode())) // 2) + CUT
    assert len(clip("é" * 3000).encode()) <= 4096 and clip("short") == "short"
    assert requested_backlog(None) == requested_backlog("") == DEFAULT_BACKLOG
    assert requested_backlog("5000") == MAX_BACKLOG and requested_backlog("-3") == 0
    with pytest.raises(ValueError):
        requested_backlog("lots")
    assert backlog_lines(b"a\nb\nc\npartial", 2) == [b"b", b"c"] and backlog_lines(b"a\n", 0) == []


def test_a_runaway_line_costs_a_bounded_buffer() -> None:
    split = LineSplitter(limit=8)
    assert split.feed(b"ab\ncd") == [b"ab"]
    assert split.feed(b"ef\n") == [b"cdef"]
    assert split.feed(b"0123456789") == [b"01234567"], "cut at the limit, the rest dropped"
    assert split.feed(b"more of the same line\nnext\n") == [b"next"]
    assert split.feed(b"x" * 20 + b"\n") == [b"x" * 8]


def test_the_token_is_checked_in_full_and_never_printed() -> None:
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN) and bearer_matches(f"bearer  {TOKEN} ", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer "):
        assert not bearer_matches(header, TOKEN), header
    assert not bearer_matches("Bearer ", ""), "an agent without a token answers no one"
    access = LogAccess(node="gpu1", address="10.0.0.5:9400", token=TOKEN)
    assert TOKEN not in repr(access) and TOKEN not in str(access)
    assert records.LOG_ACCESS.decode(keys.log_access_key("gpu1"), dumps(access.to_dict())) == access


@pytest.mark.parametrize("change", [{"token": "short"}, {"token": "a b" * 20}, {"address": "evil/path"},
                                    {"address": "user@host:1"}, {"scheme": "ftp"}, {"node": "../x"}, {"token": None}])
def test_a_damaged_log_access_record_is_refused(change: dict[str, object]) -> None:
    good = LogAccess(node="gpu1", address="10.0.0.5:9400", token=TOKEN).to_dict()
    with pytest.raises(ValidationError):
        records.LOG_ACCESS.decode(keys.log_access_key("gpu1"), dumps(good | change))


def test_which_tails_the_console_opens() -> None:
    assert tails_to_open({"b", "a"}, (), {}, 100.0) == [Opening("a", True), Opening("b", True)]
    assert tails_to_open({"a", "b"}, {"a"}, {}, 100.0) == [Opening("b", True)]
    assert tails_to_open({"a"}, (), {"a": 90.0}, 100.0, retry_s=30) == [], "failed lately: not yet"
    assert tails_to_open({"a"}, (), {"a": 60.0}, 100.0, retry_s=30) == [Opening("a", False)], "new lines only"
    assert tails_to_open((), {"gone"}, {}, 100.0) == []


def test_backlogs_merge_by_time_tagged_with_their_node() -> None:
    a = [LogLine(1.0, "m", INFO, "a1"), LogLine(3.0, "m", INFO, "a3"), LogLine(3.0, "m", INFO, "a3 again")]
    b = [LogLine(2.0, "m:1", ERR, "b2"), LogLine(3.0, "m:1", INFO, "b3")]
    merged = merge_backlogs({"n2": b, "n1": a}, limit=10)
    assert [(x["node"], x["message"]) for x in merged] == [
        ("n1", "a1"), ("n2", "b2"), ("n1", "a3"), ("n1", "a3 again"), ("n2", "b3")]
    assert merged[1] == {"node": "n2", "t": 2.0, "instance": "m:1", "priority": ERR, "message": "b2"}
    assert [x["message"] for x in merge_backlogs({"n1": a, "n2": b}, limit=2)] == ["a3 again", "b3"]
    assert merge_backlogs({"n1": a}, limit=0) == []


def test_a_line_from_an_agent_is_checked() -> None:
    line = LogLine(1.5, "m", WARNING, "x")
    assert LogLine.from_dict(line.to_dict()) == line
    bads: list[object] = [[], {"t": "now", "instance": "m", "priority": 4, "message": "x"},
                {"t": 1, "instance": "m", "priority": 9, "message": "x"}, {"t": 1, "instance": "m", "priority": 4}]
    for bad in bads:
        with pytest.raises(ValidationError):
            LogLine.from_dict(bad)
