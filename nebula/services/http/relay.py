"""Byte relay between an engine's response (upstream_http) and a downstream client.

Kept lean on purpose: the body is forwarded as the chunks arrive, never parsed (SSE included), and
content is never re-encoded (the upstream client does not decompress).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Final

from nebula.adapters.upstream_http import UpstreamError
from nebula.adapters.upstream_response import UpstreamResponse
from nebula.services.http.connection_reply import ConnectionReply
from nebula.services.http.errors import ApiError
from nebula.services.http.reply import Reply

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 7.6.1) and those each hop sets for itself.
_SKIP_REQUEST: Final = frozenset({"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te",
                                  "trailer", "transfer-encoding", "upgrade", "host", "content-length",
                                  "authorization", "x-api-key", "expect",
                                  "cookie", "x-nebula-csrf"})  # the web console's session: never an engine's business
# Content-Length too: the reply frames the body itself. X-Request-ID: the gateway names the request.
_SKIP_RESPONSE: Final = frozenset({"connection", "keep-alive", "proxy-authenticate", "te", "trailer",
                                   "transfer-encoding", "upgrade", "server", "date", "content-length",
                                   "x-request-id"})


def skipped_with(*names: str) -> frozenset[str]:
    """The client headers forward_headers drops when the gateway sets `names` itself (its `extra`): for a
    caller whose `extra` always has the same names, made once instead of on every request."""
    return _SKIP_REQUEST | {n.lower() for n in names}


def forward_headers(headers: Mapping[str, str], extra: Mapping[str, str] | None = None,
                    skip: frozenset[str] | None = None) -> dict[str, str]:
    """The request headers to send upstream: end-to-end ones only, credentials (Authorization, and the
    x-api-key Anthropic's clients send) stripped; `extra` replaces
    any client header of the same name (compared without case). `skip`: skipped_with(*extra), when the
    caller made it already.

    A header the client repeated is joined into one comma-separated field, which RFC 9110 5.3 makes
    equivalent. Accept-Encoding is pinned (identity unless the client asked): a request without one lets
    the server pick any coding (RFC 9110 12.5.3), and the relay passes bytes as they come.
    """
    if skip is None:
        skip = _SKIP_REQUEST if not extra else skipped_with(*extra)
    out: dict[str, str] = {}
    accept_encoding = False
    for k, v in headers.items():
        low = k.lower()
        if low in skip:
            continue
        accept_encoding = accept_encoding or low == "accept-encoding"
        if k in out:
            out[k] += ", " + v
        else:
            out[k] = v
    if not accept_encoding:
        out["Accept-Encoding"] = "identity"
    if extra:
        out.update(extra)
    return out


# Bodies of known length up to this size are relayed whole (see _relay_whole); larger ones stream.
WHOLE_BODY_MAX: Final = 1 << 20


class UpstreamBroke(Exception):
    """The engine's answer broke off before its whole body arrived (nothing was sent to the client yet)."""


class RelayStats:
    """What a relay saw of the body, for latency metrics: monotonic times of the first and last chunk and the
    number of SSE events (`data:` lines), which for a token stream is the number of token deltas plus one or
    two (usage, [DONE]). Counting is one bytes.count per chunk; nothing is parsed."""

    # A plain class, as every value type made per request on the compiled path: a dataclass's generated
    # __init__ stays bytecode there (scripts/compile_data_path.py).
    __slots__ = ("complete", "events", "first_chunk_at", "last_chunk_at")

    def __init__(self) -> None:
        self.first_chunk_at = 0.0
        self.last_chunk_at = 0.0
        self.events = 0
        self.complete = False


async def _before_the_client_saw_anything(read: Awaitable[bytes]) -> bytes:
    """`read`'s bytes; while nothing went to the client yet a timeout is answered 504 and a failure is
    UpstreamBroke (another replica is tried)."""
    try:
        return await read
    except TimeoutError:
        raise ApiError(504, "the model did not answer in time", code="timeout") from None
    except UpstreamError as e:
        raise UpstreamBroke(repr(e)) from e


async def relay(reply: Reply, upstream: UpstreamResponse, stats: RelayStats | None = None) -> None:
    """Send `upstream`'s status, headers and body to the client as they arrive.

    Nothing goes to the client before the body's first piece: an engine sends its head as soon as it
    takes a streamed request and its first token only after the prompt's prefill, and an engine that dies
    in between has cost the client nothing yet, so that is UpstreamBroke (another replica is tried) or,
    past upstream_timeout_s, a 504. An upstream failure later aborts the client connection rather than
    ending the response cleanly, so the client sees a truncated response as an error, not a complete one.

    A chunked body to a client that takes chunked (the data-plane server's HTTP/1.1 clients) is forwarded as
    it came: each read off the engine's socket is one write to the client, framing and all, and the parser
    only checks it and finds its end.
    """
    headers = [(k, v) for k, v in upstream.headers if k.lower() not in _SKIP_RESPONSE]
    length = upstream.content_length
    if length is not None and length <= WHOLE_BODY_MAX:
        await _relay_whole(reply, upstream, headers, stats)
        return
    if upstream.chunked and isinstance(reply, ConnectionReply) and reply.will_chunk:
        read_already, switched = upstream.passthrough()
        if switched:
            await _relay_passthrough(reply, upstream, headers, read_already, stats)
            return
        first = read_already  # the whole body had arrived already: it goes out as any other
    else:
        first = await _before_the_client_saw_anything(upstream.read_chunk())
    await reply.start(upstream.status, upstream.reason, headers)
    chunk = first
    while chunk:
        _count(stats, chunk)
        try:
            await reply.write(chunk)
        except ConnectionResetError:
            return  # the client went away; leaving the block releases the upstream connection
        try:
            chunk = await upstream.read_chunk()
        except (TimeoutError, UpstreamError) as e:
            log.warning("upstream broke mid-response: %r", e)
            reply.abort()
            return
    await reply.end()
    if stats is not None:
        stats.complete = True


def _count(stats: RelayStats | None, chunk: bytes) -> None:
    if stats is not None:
        now = time.monotonic()
        if not stats.first_chunk_at:
            stats.first_chunk_at = now
        stats.last_chunk_at = now
        stats.events += chunk.count(b"data:")


async def _relay_passthrough(reply: ConnectionReply, upstream: UpstreamResponse, headers: list[tuple[str, str]],
                             read_already: bytes, stats: RelayStats | None) -> None:
    """A chunked body forwarded in the engine's own framing (upstream.passthrough() switched): the head goes
    out with the first piece, then each read is written from its own callback (_forward_rest).

    `read_already`: the body read off the socket before the switch, framing removed, which is framed here;
    without it, the first read is waited for (and may still be retried elsewhere) and forwarded as it came.
    Either first write carries the head, so nothing is pending once the forward starts."""
    if read_already:
        first, framed = read_already, False
    else:
        first, framed = await _before_the_client_saw_anything(upstream.read_chunk()), True
    await reply.start(upstream.status, upstream.reason, headers)
    if first:
        _count(stats, first)
    try:
        if framed:
            await reply.write_chunked(first)
        else:
            await reply.write(first)
    except ConnectionResetError:
        return  # the client went away; leaving the block releases the upstream connection
    if not await _forward_rest(reply, upstream, stats):
        return
    reply.end_chunked()
    if stats is not None:
        stats.complete = True


async def _forward_rest(reply: ConnectionReply, upstream: UpstreamResponse, stats: RelayStats | None) -> bool:
    """The rest of a passthrough body, each read off the engine's socket written to the client from the read's
    own callback: no task wakes per read, only when the client falls behind or the body ends. False when the
    relay ended early (the client left, the engine broke)."""
    write = reply.chunk_writer()
    if stats is None:
        upstream.forward(write)
    else:
        counts, now = stats, time.monotonic

        def counted(data: bytes) -> bool:
            counts.last_chunk_at = now()
            counts.events += data.count(b"data:")
            return write(data)

        upstream.forward(counted)
    try:
        while not await upstream.wait_forwarded():
            await reply.drained()
            upstream.resume_forwarding()
    except ConnectionResetError:
        return False  # the client went away; leaving the block releases the upstream connection
    except (TimeoutError, UpstreamError) as e:
        log.warning("upstream broke mid-response: %r", e)
        reply.abort()
        return False
    return True


async def _relay_whole(reply: Reply, upstream: UpstreamResponse, headers: list[tuple[str, str]],
                       stats: RelayStats | None) -> None:
    """A small body of known length (every non-streamed answer): read it whole, then send headers and body
    in one write, where streaming it would cost a write (a syscall) for the headers and one per chunk."""
    body = await _before_the_client_saw_anything(upstream.read())
    if stats is not None:
        stats.first_chunk_at = stats.last_chunk_at = time.monotonic()
        stats.complete = True
    await reply.send(upstream.status, upstream.reason, headers, body)
