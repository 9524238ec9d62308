"""A malformed request on a connection the data-plane server handed to aiohttp: answered 400 in the gateway's
error shape, and logged as one warning line, not as aiohttp's traceback at ERROR
(services/http/handover_errors.py)."""

from __future__ import annotations

import json
import logging
import socket
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.test_utils import make_mocked_request

from nebula.services.http.handover_errors import JsonErrorRequestHandler
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


def test_a_malformed_request_after_a_hand_over_is_answered_in_the_error_shape(
        caplog: pytest.LogCaptureFixture) -> None:
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
            assert sock.recv(1) == b"", "the connection stays open after a malformed request"
    assert status.split(b" ")[1] == b"400", (status, body)  # aiohttp says HTTP/1.0: it read no version
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "bad_request"
    assert error["message"].startswith("malformed request: ") and "Transfer-Encoding" in error["message"]
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    assert record.levelno == logging.WARNING and record.exc_info is None
    message = record.getMessage()
    assert message.startswith("refused a malformed request from 127.0.0.1: 400") and "\n" not in message


def _request(sent: int = 0) -> web.BaseRequest:
    """A request whose answer has `sent` bytes out (the check before any error answer)."""
    return make_mocked_request("GET", "/v1/admin/models", writer=mock.Mock(output_size=sent))


def _handler() -> JsonErrorRequestHandler:
    async def unused(request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError("handle_error is called directly")

    server = web.Server(unused)
    return JsonErrorRequestHandler(server, loop=server._loop)


async def test_a_bug_outside_the_middleware_is_a_500_in_the_error_shape_with_the_traceback_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise RuntimeError("a bug in a handler")
    except RuntimeError as e:
        bug = e
    response = _handler().handle_error(_request(), 500, bug)
    assert isinstance(response, web.Response) and response.status == 500
    assert response.content_type == "application/json" and response.body is not None
    assert isinstance(response.body, bytes)
    assert json.loads(response.body)["error"]["code"] == "internal_error"
    assert "a bug in a handler" not in response.body.decode()
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.levelno == logging.ERROR and record.exc_info is not None and record.exc_info[1] is bug


async def test_the_parsers_refusal_keeps_its_status_and_is_one_line() -> None:
    fault = BadHttpMessage("Invalid header value char:\n\n  b'x\\x01'\n     ^")
    response = _handler().handle_error(_request(), 400, fault)
    assert response.status == 400 and isinstance(response, web.Response) and isinstance(response.body, bytes)
    assert json.loads(response.body)["error"]["message"] == "malformed request: Invalid header value char: b'x\\x01' ^"


async def test_no_error_answer_follows_part_of_an_answer() -> None:
    with pytest.raises(ConnectionError):
        _handler().handle_error(_request(sent=120), 500, RuntimeError("late"))
