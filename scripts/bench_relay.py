"""The floor of any Python data plane, for scripts/bench_gateway.py --tcp-relay (target tcp_relay).

A byte relay on uvloop: each client connection gets its own engine connection, and every read on one side is
written to the other as it came. No HTTP is parsed, no request is routed, authenticated or counted; the
load generator's keep-alive connections carry their requests to the engine as they are. So its CPU per
request is what the event loop and the four system calls of a relayed request cost a Python process, below
which no Python design of the gateway's data path can go: what is left between it and a Rust router is the
floor's own gap, and what is between it and Nebula is Nebula's Python work.
"""

from __future__ import annotations

import asyncio
from typing import cast


class _Side(asyncio.Protocol):
    """One end of a relayed pair: what it reads goes to the other end's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # read before the other end connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not asyncio.Transport's subclass

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def _pair(client: _Side, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    try:
        _, engine = await loop.create_connection(_Side, host, port)
    except OSError:
        if client.transport is not None:
            client.transport.close()
        return
    engine.peer, client.peer = client, engine
    assert engine.transport is not None
    for data in client.pending:
        engine.transport.write(data)
    client.pending.clear()


def serve_relay(port: int, upstream_host: str, upstream_port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        def accept() -> _Side:
            client = _Side()
            task = loop.create_task(_pair(client, upstream_host, upstream_port))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return client

        server = await loop.create_server(accept, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())
