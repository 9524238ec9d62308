"""POST /v1/audio/transcriptions and /translations through the gateway, over loopback to a fake engine that
parses the multipart form as a server does (tests/unit/fake_engine.py): routing by the form's model, the
upload's own body limit, keys and limits from the head, errors in OpenAI's shape, bytes unchanged.
(The real engine, vLLM with a tiny Whisper: tests/integration/test_audio.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from nebula.core import keys
from nebula.core.apikeys import KeyRequest, digest
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, Task, dumps
from nebula.services.gateway.audio_api import AUDIO_PATHS
from tests.unit.fake_engine import FakeEngine, put_instance
from tests.unit.served_gateway import ServedGateway, served_gateway
from tests.unit.test_audio_form import WAV, encode

ADMIN, CHAT_ONLY = "audio-admin", "audio-chat-only"
MAX_BODY, MAX_UPLOAD = 4096, 64 * 1024
SPEECH, CHAT = "speech", "chat"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServedGateway, FakeEngine]]:
    engine = FakeEngine("a")

    async def prepare(store: Any) -> None:
        endpoint = await engine.start()
        for name, task in ((SPEECH, Task.TRANSCRIBE), (CHAT, Task.GENERATE)):
            await store.put(keys.model_key(name), dumps(ModelSpec(name=name, source="/m", task=task).to_dict()))
            await put_instance(store, name, endpoint, model=name, task=task)
        record = KeyRequest.from_dict({"name": "chat-only", "models": [CHAT]}).record("00000000000000c1",
                                                                                      digest(CHAT_ONLY), 1.0)
        await store.put(keys.apikey_key("00000000000000c1"), dumps(record.to_dict()))

    cfg = GatewayConfig(admin_key_hashes=(hashlib.sha256(ADMIN.encode()).hexdigest(),), load_poll_s=0,
                        max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD)
    with served_gateway(cfg, prepare, engine.stop) as gateway:
        yield gateway, engine


def form(model: str | None = SPEECH, audio: bytes = WAV) -> tuple[str, bytes]:
    fields: list[tuple[str, str | bytes, str | None]] = [("file", audio, "clip.wav"), ("language", "en", None)]
    if model is not None:
        fields.insert(0, ("model", model, None))
    return asyncio.run(encode(fields))


def post(url: str, path: str, ctype: str, body: Any, key: str | None = ADMIN) -> requests.Response:
    headers = {"Content-Type": ctype, **({"Authorization": f"Bearer {key}"} if key else {})}
    return requests.post(f"{url}/v1/{path}", data=body, headers=headers, timeout=10)


def head_only(url: str, path: str, length: int, key: str | None) -> tuple[int, dict[str, Any]]:
    """Send only a request's head (a body of `length` bytes announced, none sent) and read the answer: what
    the gateway says before it reads a body."""
    host, port = url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"POST /v1/{path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  f"{auth}Content-Length: {length}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations deprecated
def test_the_openai_sdk_transcribes_and_translates_through_the_gateway(
        served: tuple[ServedGateway, FakeEngine]) -> None:
    gateway, engine = served
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN, max_retries=0)
    text = client.audio.transcriptions.create(model=SPEECH, file=("clip.wav", WAV, "audio/wav"))
    assert text.text == "hello from a"
    assert text.model_extra == {"model": SPEECH, "file_bytes": len(WAV)}  # what the engine parsed
    assert engine.received[-1].path == "/v1/audio/transcriptions"
    translated = client.audio.translations.create(model=SPEECH, file=("clip.wav", WAV, "audio/wav"))
    assert translated.text == "hello from a"
    assert engine.received[-1].path == "/v1/audio/translations"


@pytest.mark.parametrize("path", AUDIO_PATHS)
def test_an_upload_over_max_body_bytes_reaches_the_engine_byte_for_byte(
        served: tuple[ServedGateway, FakeEngine], path: str) -> None:
    gateway, engine = served
    ctype, body = form(audio=WAV * 12)
    assert MAX_BODY < len(body) < MAX_UPLOAD  # its own limit, not the JSON paths'
    resp = post(gateway.url, path, ctype, body)
    assert resp.status_code == 200, resp.text
    got = engine.received[-1]
    assert (got.path, got.body, got.headers["Content-Type"]) == (f"/v1/{path}", body, ctype)
    assert resp.headers["X-Engine"] == "a" and resp.headers["X-Request-ID"] == got.headers["X-Request-ID"]


def test_a_chunked_upload_takes_the_aiohttp_path_with_the_same_limit(served: tuple[ServedGateway, FakeEngine]) -> None:
    gateway, engine = served
    ctype, body = form(audio=WAV * 12)
    resp = post(gateway.url, AUDIO_PATHS[0], ctype, iter([body[:1000], body[1000:]]))  # a generator: chunked
    assert resp.status_code == 200, resp.text
    assert engine.received[-1].body == body
    big_ctype, big = form(audio=WAV * 80)
    assert len(big) > MAX_UPLOAD
    resp = post(gateway.url, AUDIO_PATHS[0], big_ctype, iter([big[i:i + 8192] for i in range(0, len(big), 8192)]))
    assert resp.status_code == 413
    assert "gateway.max_upload_bytes" in resp.json()["error"]["message"]


def test_limits_and_keys_answer_from_the_head_before_the_body(served: tuple[ServedGateway, FakeEngine]) -> None:
    gateway, _ = served
    status, error = head_only(gateway.url, AUDIO_PATHS[0], MAX_UPLOAD + 1, ADMIN)
    assert (status, error["code"]) == (413, "request_too_large")
    assert f"limit of {MAX_UPLOAD} bytes (gateway.max_upload_bytes)" in error["message"]
    status, error = head_only(gateway.url, AUDIO_PATHS[1], 1000, None)  # a key exists: one is needed
    assert (status, error["type"]) == (401, "authentication_error")
    # The JSON paths keep max_body_bytes.
    status, error = head_only(gateway.url, "chat/completions", MAX_BODY + 1, ADMIN)
    assert status == 413 and "(gateway.max_body_bytes)" in error["message"]


@pytest.mark.parametrize(("case", "status", "param", "code"), [
    ("no model field", 400, "model", "invalid_value"),
    ("unknown model", 404, "model", "model_not_found"),
    ("a chat model", 400, "model", "model_not_supported"),
    ("not multipart", 400, "Content-Type", "invalid_value"),
    ("malformed multipart", 400, None, None),
    ("key for other models", 403, "model", "model_not_allowed"),
])
def test_bad_uploads_get_openai_shaped_errors(served: tuple[ServedGateway, FakeEngine], case: str, status: int,
                                              param: str | None, code: str | None) -> None:
    gateway, engine = served
    before = len(engine.received)
    ctype, body = form()
    key = ADMIN
    if case == "no model field":
        ctype, body = form(model=None)
    elif case == "unknown model":
        ctype, body = form(model="nope")
    elif case == "a chat model":
        ctype, body = form(model=CHAT)
    elif case == "not multipart":
        ctype, body = "application/json", json.dumps({"model": SPEECH}).encode()
    elif case == "malformed multipart":
        body = body[: len(body) // 2]
    else:
        key = CHAT_ONLY
    resp = post(gateway.url, AUDIO_PATHS[0], ctype, body, key)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error"}[status]
    assert len(engine.received) == before  # refused at the edge
