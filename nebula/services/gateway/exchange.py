"""One inference request's bookkeeping as it crosses the gateway: its id, the replica that answered, the
number of attempts and what the relay saw of the body (for TTFT and inter-token latency)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Final

from aiohttp import web

from nebula.services.http.relay import RelayStats

REQUEST_ID_HEADER: Final = "X-Request-ID"
# An incoming id is kept if it is short printable ASCII: it goes into headers and journal fields as is.
_ACCEPTABLE_ID: Final = re.compile(r"[\x21-\x7e]{1,128}")
REQUEST_ID: Final = web.RequestKey("nebula_request_id", str)


def new_request_id(incoming: str | None, random_bits: Callable[[int], int] = secrets.randbits) -> str:
    """The client's X-Request-ID when acceptable, else a new id: 32 hex digits from `random_bits`."""
    return incoming if incoming and _ACCEPTABLE_ID.fullmatch(incoming) else f"{random_bits(128):032x}"


def request_id(request: web.Request) -> str:
    """The request's id (see new_request_id), the same on every call."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        rid = request[REQUEST_ID] = new_request_id(request.headers.get(REQUEST_ID_HEADER))
    return rid


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, errors included, names its request (replacing an engine's own)."""
    response.headers[REQUEST_ID_HEADER] = request_id(request)


class Exchange:
    __slots__ = ("attempts", "model", "replica", "request_id", "stats")

    # A plain class: made per request on the compiled path (relay.RelayStats says why).
    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        self.replica = ""  # the replica that answered, once one did
        self.attempts = 0
        self.stats = RelayStats()

    def log_fields(self) -> dict[str, str]:
        fields = {"NEBULA_REQUEST_ID": self.request_id, "NEBULA_MODEL": self.model}
        if self.replica:
            fields["NEBULA_INSTANCE"] = self.replica
        return fields
