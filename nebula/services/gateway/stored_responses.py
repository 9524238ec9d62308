"""Where a Responses API request goes: a new response is named for the replica it is made on, and a request
about a stored one (GET, cancel, a `previous_response_id` follow-up) goes to the replica its id names.

The ids are core/response_ids.py's: the gateway sets the body's `request_id` (vLLM's name for the response)
per attempt, for the replica actually tried, so a retry on another replica names that one. Nothing is kept
here: every gateway worker and every gateway reads the same replica tokens from the instance records.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any

from nebula.core.response_ids import RANDOM_HEX, response_id, token_of, with_request_id
from nebula.core.routing import Replica
from nebula.services.gateway.forward import Target
from nebula.services.gateway.state import GatewayState
from nebula.services.http.errors import ApiError

# The engines keep stored responses only with VLLM_ENABLE_RESPONSES_API_STORE (engine.responses_store).
GONE = "response_replica_gone"
NOT_FOUND = "response_not_found"


def not_found(rid: str, param: str) -> ApiError:
    """404 as vLLM words it, for an id no replica of this cluster could hold (or the key may not see)."""
    return ApiError(404, f"Response with id '{rid}' not found.", param=param, code=NOT_FOUND)


def holder(st: GatewayState, rid: str, param: str) -> Replica:
    """The READY replica whose incarnation made the response `rid`; ApiError 404 when `rid` is not an id
    the gateway issued, or when that replica is gone (unloaded, moved, restarted: its store went with it)."""
    token = token_of(rid)
    if token is None:
        raise not_found(rid, param)
    for replicas in st.table.ready().values():
        for replica in replicas:
            if replica.incarnation == token:
                return replica
    raise ApiError(404, f"Response with id '{rid}' is gone: the replica that held it stopped, restarted or "
                   "is no longer ready, and a stored response lives only in its replica's memory. Start the "
                   "conversation again (send the whole input, without previous_response_id).",
                   param=param, code=GONE)


def _on(replica: Replica) -> Callable[[Replica], bool]:
    return lambda r: r.incarnation == replica.incarnation


def create_target(st: GatewayState, body: Mapping[str, Any], raw: bytes, target: Target) -> Target:
    """POST /v1/responses: `target` narrowed to the replica holding `previous_response_id` (if any), with a
    body per replica whose request_id names that replica. ApiError 404 when the previous response's replica
    is gone, 400 when it belongs to another model than the request names."""
    eligible = target.eligible
    previous = body.get("previous_response_id")
    if isinstance(previous, str):
        home = holder(st, previous, "previous_response_id")
        if home.model != target.model:
            raise ApiError(400, f"previous_response_id '{previous}' was made by model '{home.model}', not "
                           f"'{target.model}': continue a conversation with the model that began it",
                           param="previous_response_id", code="model_mismatch")
        on_home = _on(home)
        base = eligible
        eligible = on_home if base is None else (lambda r: base(r) and on_home(r))

    def body_for(replica: Replica) -> bytes:
        return with_request_id(raw, body, response_id(replica.incarnation, secrets.token_hex(RANDOM_HEX // 2)))

    return Target(target.model, eligible, body_for, target.method)


def stored_target(st: GatewayState, rid: str, method: str) -> Target:
    """GET /v1/responses/{rid} and its cancel: only the replica that holds it (ApiError 404 as `holder`)."""
    home = holder(st, rid, "response_id")
    return Target(home.model, _on(home), None, method)
