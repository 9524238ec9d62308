"""The console's live feed: one server-sent-events stream per open console.

Change detection costs nothing: the gateway's own etcd mirrors (models, instances) are in memory, and
the stream looks at them every second; only when they changed (or every FLEET_REFRESH_S, for the node
records and pending reasons, which this gateway does not mirror) does it read the fleet from etcd, the
same reads as GET /v1/admin/models and /v1/admin/nodes, and push it. The gateway's figures (its own
metrics) go out every FIGURES_S. A browser never polls; it reconnects when the stream breaks.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from aiohttp import web

from nebula.core import keys, records
from nebula.core.discovery import ServiceRecord
from nebula.services.gateway import console_session as cs
from nebula.services.gateway import gpu_live, rollout_status
from nebula.services.gateway.console import CONSOLE, ConsoleState
from nebula.services.gateway.console_figures import model_figures
from nebula.services.gateway.gpu_live import GpuLive
from nebula.services.gateway.records import decoded, model_listing, node_records
from nebula.services.gateway.state import GATEWAY, GatewayState

TICK_S = 1.0
FIGURES_S = 2.0
FLEET_REFRESH_S = 10.0
KEEPALIVE_S = 15.0


async def fleet(st: GatewayState, gpus: GpuLive | None = None) -> dict[str, Any]:
    """Models (as GET /v1/admin/models shows them) and nodes (as GET /v1/admin/nodes), with what `nebula status`
    adds (each node's drain state, each updated model's rollout line) and, from `gpus`, each GPU's utilisation
    and temperature."""
    node_items, models = await model_listing(st.store, st.view.wakes)
    placed = Counter(split[0] for kv in (await st.store.list_prefix(keys.PLACEMENTS)).items
                     if (split := keys.split_placement_key(kv.key)) is not None)
    nodes = [n.to_dict() | {"placements": placed[n.name]} for n in node_records(node_items)]
    out = {"models": models, "nodes": nodes}
    await rollout_status.annotate(st.store, out)
    if gpus is not None and any(n["gpus"] for n in nodes):
        async def services() -> list[ServiceRecord]:
            return decoded(records.SERVICES, (await st.store.list_prefix(keys.SERVICES)).items)

        gpu_live.annotate(nodes, await gpus.figures(services))
    return out


def _mirror_mark(st: GatewayState) -> object:
    """Something that differs whenever the mirrors saw a change that shows on the fleet page."""
    return (id(st.view.models), {m: sorted((p.value, n) for p, n in c.items()) for m, c in st.table.phases().items()},
            {m: len(r) for m, r in st.table.ready().items()})


def _event(kind: str, data: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """GET /ui/api/events: `fleet`, `figures` and `session` events until the client goes away or its
    session ends (an `expired` event tells the page to sign in again)."""
    st, con = request.app[GATEWAY], request.app[CONSOLE]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await _feed(st, con, request.cookies.get(cs.COOKIE), response)
    except ConnectionResetError:  # the console was closed (a tab, a laptop lid): the usual end, not an error
        pass
    return response


async def _feed(st: GatewayState, con: ConsoleState, token: str | None, response: web.StreamResponse) -> None:
    await response.write(b"retry: 2000\n\n")
    mark: object = None
    clock = asyncio.get_running_loop().time
    last_fleet = last_figures = last_write = -1e9
    while True:
        now = clock()
        if token:
            try:  # the session may expire, or its key be revoked, while the stream is open
                cs.check(con.secret, token, con.wall(), "GET", None, st.auth.by_id, st.auth.is_open)
            except cs.SessionError as e:
                await response.write(_event("expired", {"message": str(e)}))
                return
        new_mark = _mirror_mark(st)
        if new_mark != mark or now - last_fleet >= FLEET_REFRESH_S:
            mark, last_fleet = new_mark, now
            try:
                event = _event("fleet", await fleet(st, con.gpus))
            except Exception as e:  # etcd unreachable: say so, keep the stream (the page shows a banner)
                event = _event("trouble", {"message": f"cannot read the cluster: {e}"})
            await response.write(event)
            last_write = now
        if now - last_figures >= FIGURES_S:
            last_figures = last_write = now
            await response.write(_event("figures", {"at": con.wall(),
                                                    "models": model_figures(con.registry.collect())}))
        if now - last_write >= KEEPALIVE_S:
            last_write = now
            await response.write(b": keep-alive\n\n")
        await asyncio.sleep(TICK_S)
