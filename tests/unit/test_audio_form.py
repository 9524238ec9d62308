"""The form of an audio upload (gateway/audio_form.py): what the gateway reads of it to route, and that any
bytes at all give either a form or a 400, never another error."""

from __future__ import annotations

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.errors import ValidationError
from nebula.services.gateway.audio_form import AudioForm, check_content_type, form_model, read_form

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4  # the gateway never looks inside


async def encode(fields: list[tuple[str, str | bytes, str | None]]) -> tuple[str, bytes]:
    """A multipart/form-data body as aiohttp's client writes it: (name, value, filename) per part."""
    writer = aiohttp.MultipartWriter("form-data")
    for name, value, filename in fields:
        if filename:
            part = writer.append(value, {"Content-Type": "audio/wav"})
            part.set_content_disposition("form-data", name=name, filename=filename)
        else:
            writer.append(value).set_content_disposition("form-data", name=name)
    return writer.headers["Content-Type"], await writer.as_bytes()


@pytest.mark.parametrize("value", [
    "multipart/form-data; boundary=abc",
    'multipart/form-data; boundary="a b c"',
    "Multipart/Form-Data; charset=utf-8; boundary=" + "x" * 70,
])
def test_multipart_form_data_with_a_boundary_is_an_upload(value: str) -> None:
    assert check_content_type(value) == value


@pytest.mark.parametrize(("value", "says"), [
    (None, "must be multipart/form-data"),
    ("", "must be multipart/form-data"),
    ("application/json", "not application/json"),
    ("multipart/mixed; boundary=abc", "not multipart/mixed"),
    ("multipart/form-data", "needs a boundary"),
    ("multipart/form-data; boundary=", "needs a boundary"),
    ("multipart/form-data; boundary=" + "x" * 71, "needs a boundary of 1 to 70"),
])
def test_anything_else_is_refused_naming_the_header(value: str | None, says: str) -> None:
    with pytest.raises(ValidationError, match=says) as e:
        check_content_type(value)
    assert e.value.field == "Content-Type"


def test_the_model_must_be_given_exactly_once_and_not_blank() -> None:
    assert form_model(["whisper"]) == "whisper"
    for values, says in (([], "is required"), (["a", "b"], "given once"), (["  "], "must not be empty")):
        with pytest.raises(ValidationError, match=says) as e:
            form_model(values)
        assert e.value.field == "model"


async def test_a_client_s_form_gives_its_model_and_file_name() -> None:
    ctype, body = await encode([("file", WAV, "clip.wav"), ("model", "whisper", None),
                                ("language", "en", None), ("response_format", "json", None)])
    assert await read_form(ctype, body) == AudioForm("whisper", "clip.wav")


async def test_a_large_upload_is_read_whole() -> None:
    ctype, body = await encode([("model", "whisper", None), ("file", WAV * 1000, "long.wav")])
    assert len(body) > 1_000_000
    assert await read_form(ctype, body) == AudioForm("whisper", "long.wav")


@pytest.mark.parametrize(("fields", "field", "says"), [
    ([("file", WAV, "a.wav")], "model", "is required"),
    ([("model", "whisper", None)], "file", "is required"),
    ([("model", "a", None), ("model", "b", None), ("file", WAV, "a.wav")], "model", "given once"),
    ([("model", "", None), ("file", WAV, "a.wav")], "model", "must not be empty"),
    ([("model", b"\xff\xfe", None), ("file", WAV, "a.wav")], "model", "UTF-8"),
    ([("model", "m" * 1025, None), ("file", WAV, "a.wav")], "model", "longer than 1024"),
])
async def test_a_form_without_what_routing_needs_is_a_400_naming_the_field(
        fields: list[tuple[str, str | bytes, str | None]], field: str, says: str) -> None:
    ctype, body = await encode(fields)
    with pytest.raises(ValidationError, match=says) as e:
        await read_form(ctype, body)
    assert e.value.field == field


async def test_a_body_that_breaks_its_boundary_is_malformed() -> None:
    ctype, body = await encode([("model", "whisper", None), ("file", WAV, "a.wav")])
    for broken in (b"", b"not multipart at all", body[:40], body[:-12], body.replace(b"\r\n\r\n", b"\r\n", 1)):
        with pytest.raises(ValidationError, match="malformed multipart"):
            await read_form(ctype, broken)


@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader",
                            "ignore::aiohttp.multipart.BadContentDispositionParam")
@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_any_bytes_give_a_form_or_a_400(data: st.DataObject) -> None:
    ctype, body = await encode([("model", "whisper", None), ("file", WAV[:64], "a.wav")])
    # Cuts, splices and junk around a real body, and junk alone.
    junk = data.draw(st.binary(max_size=200))
    start = data.draw(st.integers(0, len(body)))
    end = data.draw(st.integers(start, len(body)))
    candidate = data.draw(st.sampled_from([junk, body[:start] + junk + body[end:], body[start:end], junk + body]))
    try:
        form = await read_form(ctype, candidate)
    except ValidationError:
        return
    assert form.model.strip()
