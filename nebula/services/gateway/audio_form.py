"""The multipart/form-data uploads of /v1/audio/*: read just enough of the form to route it.

The gateway needs the form's `model` (to pick a replica and check the key's models) and checks that a
`file` part is there, so the common mistakes get a clear 400 at the edge; the upload itself goes to the
engine as the client sent it, boundary and all, and the engine judges the rest (audio format, language).

The parser is aiohttp's MultipartReader, the one behind aiohttp's own `request.multipart()` and `post()`:
already a dependency of the gateway, maintained with aiohttp's HTTP parsers, and strict about boundaries and
part headers. (python-multipart, which Starlette and so vLLM use, would be a new dependency for the same
job.) It reads from a stream, so the body, already in memory and bounded by gateway.max_upload_bytes, is
fed to an aiohttp StreamReader at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import BodyPartReader, MultipartReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from nebula.errors import ValidationError

MAX_MODEL_FIELD = 1024  # bytes of the `model` field: a model name is at most 63 characters
MAX_BOUNDARY = 70  # RFC 2046 5.1.1


@dataclass(frozen=True, slots=True)
class AudioForm:
    model: str
    filename: str  # the `file` part's filename ('' when the client gave none)


def check_content_type(value: str | None) -> str:
    """The request's Content-Type, if it is multipart/form-data with a usable boundary; else ValidationError."""
    if not value:
        raise ValidationError("Content-Type", "an audio upload must be multipart/form-data (with a 'file' and "
                              "a 'model' field)")
    mime = parse_mimetype(value)
    if (mime.type, mime.subtype) != ("multipart", "form-data"):
        raise ValidationError("Content-Type", f"must be multipart/form-data, not {mime.type}/{mime.subtype}")
    boundary = mime.parameters.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise ValidationError("Content-Type", f"multipart/form-data needs a boundary of 1 to {MAX_BOUNDARY} "
                              "characters")
    return value


def form_model(values: list[str]) -> str:
    """The model a form names, from the values of its `model` fields; ValidationError unless exactly one,
    not blank (two could route to one model while the engine reads the other)."""
    if not values:
        raise ValidationError("model", "is required: a form field naming a loaded transcribe model")
    if len(values) > 1:
        raise ValidationError("model", "must be given once")
    model = values[0]
    if not model.strip():
        raise ValidationError("model", "must not be empty")
    return model


async def read_form(content_type: str | None, body: bytes) -> AudioForm:
    """Parse `body` as the form of an audio upload: its model, and that it has a file. Raises
    ValidationError (a 400 naming the field) for anything else, a malformed multipart body included."""
    ctype = check_content_type(content_type)
    models: list[str] = []
    filename: str | None = None
    stream = _stream(body)
    try:
        reader = MultipartReader({"Content-Type": ctype}, stream)
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ValidationError("", "a nested multipart part is not a form field")
            if part.name == "model":
                raw = await part.read()  # decodes a Content-Transfer-Encoding, if any
                if len(raw) > MAX_MODEL_FIELD:
                    raise ValidationError("model", f"is longer than {MAX_MODEL_FIELD} bytes")
                models.append(raw.decode("utf-8"))
            else:
                if part.name == "file" and filename is None:
                    filename = part.filename or ""
                await part.release()  # read through to the next boundary, keeping nothing
    except ValidationError:
        raise
    except UnicodeDecodeError:
        raise ValidationError("model", "must be UTF-8 text") from None
    except (ValueError, HttpProcessingError) as e:
        # What aiohttp raises on a body that does not follow its boundary (missing or bad delimiters, a
        # part head it cannot parse, a body cut short): the client's mistake, so a 400.
        raise ValidationError("", f"malformed multipart/form-data body ({type(e).__name__})") from None
    model = form_model(models)
    if filename is None:
        raise ValidationError("file", "is required: the audio to transcribe, as a file part")
    return AudioForm(model, filename)


def _stream(body: bytes) -> StreamReader:
    loop = asyncio.get_running_loop()
    # Its high-water mark (twice the limit) above the body: a reader over it would ask the protocol to pause
    # reading, and this protocol has no connection to pause.
    stream = StreamReader(BaseProtocol(loop), max(len(body), 2**16), loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    return stream
