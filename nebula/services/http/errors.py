"""API errors in the shape each client expects, with the right HTTP status.

OpenAI's `{"error": {"message", "type", "param", "code"}}` everywhere, except on Anthropic's Messages API
(`/v1/messages...`), whose clients (the `anthropic` SDK, Claude Code) read
`{"type": "error", "error": {"type", "message"}}`; which one is decided from the request's path where the
error is answered (`as_api_error`, `error_middleware`), so a refusal before any route ran (a missing key,
an oversized body) has its path's shape too.

Handlers raise `ApiError`; `error_middleware` (and the data-plane server, through `as_api_error`) turns it
into that shape, and also aiohttp's own HTTP errors
(404 for an unknown path, 413 for an oversized body), invalid input (ValidationError: 400 naming the
field) and an unreachable store (TemporaryError: 503 with Retry-After). Anything else is a bug: logged
with its traceback, answered with a 500 in the same shape, never a traceback to the client.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from nebula.errors import TemporaryError, ValidationError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# OpenAI's error types by status; `code` narrows them further (model_not_found, invalid_api_key...).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error", 502: "server_error", 503: "server_error",
          504: "server_error"}

# Anthropic's error types by status (its API's errors page; the SDK's ErrorObject union): 413 is answered
# as invalid_request_error, the only one of them the SDK parses for it.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                    409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                    503: "overloaded_error", 504: "timeout_error"}
ANTHROPIC_PATH = "/v1/messages"


class ErrorShape(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def shape_for_path(path: str) -> ErrorShape:
    """The error shape the clients of `path` read."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return ErrorShape.ANTHROPIC
    return ErrorShape.OPENAI


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})
        self.shape = ErrorShape.OPENAI  # set from the request's path where the error is answered

    @staticmethod
    def invalid(e: ValidationError) -> ApiError:
        """400 naming the offending field (the field is also `param`, as OpenAI does)."""
        return ApiError(400, str(e), param=e.field or None, code="invalid_value" if e.field else None)

    def body(self) -> bytes:
        if self.shape is ErrorShape.ANTHROPIC:
            kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
            return json.dumps({"type": "error", "error": {"type": kind, "message": self.message}}).encode()
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                     "code": self.code}}).encode()

    def for_path(self, path: str) -> ApiError:
        """This error, to be answered in the shape the clients of `path` read."""
        self.shape = shape_for_path(path)
        return self

    def response(self) -> web.Response:
        return web.Response(body=self.body(), status=self.status, headers=self.headers,
                            content_type="application/json")


def unavailable(message: str, retry_after_s: int = 1, code: str = "service_unavailable") -> ApiError:
    return ApiError(503, message, code=code, headers={"Retry-After": str(retry_after_s)})


_REFUSAL_CODES = {400: "bad_request", 408: "request_timeout", 413: "request_too_large",
                  431: "request_header_fields_too_large", 501: "not_implemented", 505: "http_version_not_supported"}


def refusal(status: int, message: str, path: str = "") -> ApiError:
    """The answer to a request the server will not read (a malformed or oversized head, a body too slow or
    too large, the connection cap), in the shape of `path`'s clients when its head was read."""
    if status == 503:
        return unavailable(message, code="too_many_connections").for_path(path)
    return ApiError(status, message, code=_REFUSAL_CODES.get(status)).for_path(path)


def as_api_error(e: Exception, method: str, path: str) -> ApiError:
    """What a request for `path` that raised `e` is answered, in the path's shape: ApiError as is, invalid
    input 400, an unreachable store 503; anything else is a bug, logged with its traceback and answered 500
    (never the traceback)."""
    return _as_api_error(e, method, path).for_path(path)


def _as_api_error(e: Exception, method: str, path: str) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValidationError):
        return ApiError.invalid(e)
    if isinstance(e, TemporaryError):
        log.warning("%s %s: temporary failure: %r", method, path, e)
        return unavailable("a backing service is temporarily unavailable; retry shortly")
    log.error("bug while handling %s %s", method, path, exc_info=e)
    return ApiError(500, "internal error (logged by the server)", code="internal_error")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise  # redirects and the like are not errors
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        message = f"{e.text} (gateway.max_body_bytes)" if e.status == 413 and e.text else (e.reason or "error")
        return ApiError(e.status, message, code=code).for_path(request.path).response()
    except ConnectionError:
        raise  # the client went away: nothing to answer
    except Exception as e:
        return as_api_error(e, request.method, request.path).response()
