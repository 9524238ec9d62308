"""A malformed request on a connection the data-plane server handed to aiohttp: answered 400 by aiohttp, and
logged as one warning line, not as aiohttp's traceback at ERROR (services/http/handover_log.py)."""

from __future__ import annotations

import logging
import socket
import sys

import pytest

from nebula.services.http.handover_log import AIOHTTP_SERVER_LOGGER, MalformedRequestLog
from tests.unit.served_gateway import ADMIN_KEY, served_gateway


def _answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One answer's status line and body (Content-Length framed, or up to the close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head.split(b"\r\n")[0], body


def test_a_malformed_request_after_a_hand_over_is_a_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with served_gateway() as gateway:
        host, port = gateway.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # An admin path: the data-plane server hands the connection to aiohttp, which keeps it.
            sock.sendall(b"GET /v1/admin/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + ADMIN_KEY.encode() + b"\r\n\r\n")
            status, _ = _answer(sock)
            assert status == b"HTTP/1.1 200 OK"
            # The next request on it is aiohttp's to parse.
            sock.sendall(b"GET /v1/admin/models HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: 0\r\n\r\n")
            status, body = _answer(sock)
    assert status.split(b" ")[1] == b"400", (status, body)  # aiohttp says HTTP/1.0: it read no version
    server_records = [r for r in caplog.records if r.name == AIOHTTP_SERVER_LOGGER]
    assert server_records, "aiohttp logged nothing of the malformed request"
    for record in server_records:
        assert record.levelno == logging.WARNING and record.exc_info is None, record.getMessage()
        message = record.getMessage()
        assert message.startswith("refused a malformed request from 127.0.0.1") and "\n" not in message
        assert "Transfer-Encoding" in message


def test_other_aiohttp_records_keep_their_level_and_traceback() -> None:
    try:
        raise RuntimeError("a bug in a handler")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(AIOHTTP_SERVER_LOGGER, logging.ERROR, __file__, 1, "Error handling request from %s",
                               ("127.0.0.1",), exc_info)
    assert MalformedRequestLog().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is exc_info
    assert record.getMessage() == "Error handling request from 127.0.0.1"
