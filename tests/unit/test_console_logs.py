"""The console's live tail of engine logs, over loopback: a real node agent endpoint (services/agent/logs_api.py)
following a real journal (files written by systemd-journal-remote, read by journalctl -f, as `nebula logs`
reads them) or the engines' log files, and a real gateway merging the agents' tails into one event stream for
an admin session. The token is asked for (none or a wrong one: 401), the tails are bounded, and a client that
goes away ends the journal reader; a node whose agent is unknown, refuses or publishes garbage is one
`unavailable` event, not the end of the stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula.adapters.engine_log_sources import FileLogSource, JournalLogSource
from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.engine_logs import ENGINE_SLICE, EngineLogSource, LogAccess
from nebula.core.model import InstanceStatus, ModelSpec, Phase, dumps
from nebula.services.agent import logs_api
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.console_logs import CONSOLE_LOGS
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.harness.ports import free_port
from tests.unit.fake_engine import until

JOURNAL_REMOTE = Path("/lib/systemd/systemd-journal-remote")
TOKEN = "T" * 43
ADMIN = "admin-token"
# Real journal files need systemd-journal-remote and journalctl (scripts/test.sh installs both): without
# them these tests fail, never skip. A tail that hangs fails in a minute, not at the suite's limit.
pytestmark = pytest.mark.timeout(60)


def journal(directory: Path, name: str, *entries: tuple[float, str, str, int]) -> None:
    """Entries (time, unit, message, priority) into a real journal file in `directory`."""
    export = b"".join(
        f"__REALTIME_TIMESTAMP={int(t * 1e6)}\n__MONOTONIC_TIMESTAMP=1\n_BOOT_ID={'1a' * 16}\n_HOSTNAME=gpu1\n"
        f"_SYSTEMD_UNIT={unit}\n_SYSTEMD_SLICE={ENGINE_SLICE}\nPRIORITY={prio}\nMESSAGE={msg}\n\n".encode()
        for t, unit, msg, prio in entries)
    subprocess.run([str(JOURNAL_REMOTE), f"--output={directory / name}.journal", "-"], input=export, check=True,
                   capture_output=True)


def readers(directory: Path) -> int:
    """journalctl processes reading `directory` now."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            count += f"--directory={directory}".encode() in cmdline.read_bytes()
        except OSError:
            pass
    return count


async def serve_agent(source: EngineLogSource, max_tails: int = 4) -> AsyncIterator[str]:
    app = web.Application()
    app[logs_api.ENGINE_LOGS] = logs_api.EngineLogs(source, TOKEN, max_tails=max_tails, keepalive_s=0.3)
    app.add_routes(logs_api.routes())
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)  # as serve_until_cancelled runs it
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    d = tmp_path / "journal"
    d.mkdir()
    journal(d, "a", (1700000000.0, "nebula-engine@tiny.service", "INFO 05-12 starting vLLM", 6),
            (1700000001.0, "nebula-engine@tiny.service", "ERROR 05-12 something failed", 6),
            (1700000002.0, "nebula-engine@other.service", "another model's line", 6))
    return d


@pytest.fixture
async def agent(jdir: Path) -> AsyncIterator[str]:
    async for address in serve_agent(JournalLogSource(directory=str(jdir)), max_tails=2):
        yield address


async def ndjson(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < count:
        raw = await asyncio.wait_for(resp.content.readline(), 10)
        assert raw, f"the stream ended after {out}"
        if raw.strip():
            out.append(json.loads(raw))
    return out


async def test_the_agent_follows_the_journal_for_its_token_only(agent: str, jdir: Path) -> None:
    url = f"http://{agent}{logs_api.LOGS_PATH}?model=tiny&lines=10"
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": TOKEN},
                        {"Authorization": f"Bearer {TOKEN[:-1]}"}):
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 401 and "log token" in (await resp.json())["error"]["message"]
        assert readers(jdir) == 0, "a refused caller starts no reader"
        right = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(url.replace("tiny", "../x"), headers=right) as resp:
            assert resp.status == 400
        async with http.get(url, headers=right) as resp:
            assert resp.status == 200 and resp.content_type == "application/x-ndjson"
            first = await ndjson(resp, 2)
            assert [(x["instance"], x["priority"], x["message"]) for x in first] == [
                ("tiny", 6, "INFO 05-12 starting vLLM"), ("tiny", 3, "ERROR 05-12 something failed")]
            journal(jdir, "b", (1700000003.0, "nebula-engine@tiny:1.service", "a new replica's line", 6))
            assert (await ndjson(resp, 1))[0] | {"t": 0} == {"t": 0, "instance": "tiny:1", "priority": 6,
                                                              "message": "a new replica's line"}
            assert readers(jdir) == 1
        await until(lambda: readers(jdir) == 0, 10)  # the caller went away: journalctl is gone


async def taken(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
    """GET `url` until the agent takes it, for up to 10 s: a tail's slot comes back only once its journalctl has
    exited (so the bound holds on processes), a moment after its caller left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        resp = await http.get(url, headers=headers)
        if resp.status != 429 or loop.time() > deadline:
            return resp
        resp.release()
        await asyncio.sleep(0.05)


async def test_an_agent_serves_a_bounded_number_of_tails(agent: str, jdir: Path) -> None:
    url = f"http://{agent}{logs_api.LOGS_PATH}?model=tiny&lines=1"
    right = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        first, second = await http.get(url, headers=right), await http.get(url, headers=right)
        assert first.status == second.status == 200
        async with http.get(url, headers=right) as third:
            assert third.status == 429 and (await third.json())["error"]["code"] == "too_many_tails"
        first.close()
        async with await taken(http, url, right) as again:  # the first tail's slot came back
            assert again.status == 200 and len(await ndjson(again, 1)) == 1
            # Its reader starts after the answer's head (and a backlog's reader hands over to a follower), so
            # wait for the steady count: one journalctl per open tail.
            await until(lambda: readers(jdir) == 2, 10)
        second.close()
    await until(lambda: readers(jdir) == 0, 10)


async def test_without_systemd_the_agent_follows_the_engines_log_files(tmp_path: Path) -> None:
    (tmp_path / "tiny.log").write_bytes(b"old\nINFO one\nWARNING two\npart")
    (tmp_path / "tinyllama.log").write_bytes(b"another model\n")
    async for address in serve_agent(FileLogSource(tmp_path, poll_s=0.05)):
        async with aiohttp.ClientSession() as http, http.get(
                f"http://{address}{logs_api.LOGS_PATH}?model=tiny&lines=2",
                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert [(x["instance"], x["priority"], x["message"]) for x in await ndjson(resp, 2)] == [
                ("tiny", 6, "INFO one"), ("tiny", 4, "WARNING two")]
            with (tmp_path / "tiny.log").open("ab") as f:
                f.write(b"ial\n\xff\xfe not utf-8\n")
            (tmp_path / "tiny:1.log").write_bytes(b"ERROR replica one\n")
            got = {(x["instance"], x["message"]) for x in await ndjson(resp, 3)}
            assert got == {("tiny", "partial"), ("tiny", "\ufffd\ufffd not utf-8"), ("tiny:1", "ERROR replica one")}


# --- the gateway's stream --------------------------------------------------------------------------------

async def events(resp: aiohttp.ClientResponse, until_: Any) -> list[tuple[str, Any]]:
    """Server-sent events until `until_(events so far)` holds."""
    out: list[tuple[str, Any]] = []
    kind = ""
    while not until_(out):
        raw = (await asyncio.wait_for(resp.content.readline(), 10)).decode()
        assert raw, f"the stream ended after {out}"
        if raw.startswith("event: "):
            kind = raw[7:].strip()
        elif raw.startswith("data: "):
            out.append((kind, json.loads(raw[6:])))
    return out


def messages(got: list[tuple[str, Any]]) -> list[tuple[str, str, str]]:
    return [(x["node"], x["instance"], x["message"]) for kind, data in got if kind == "lines" for x in data]


async def test_the_console_merges_the_nodes_tails_for_an_admin_session(
        agent: str, jdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    await store.put(keys.model_key("tiny"), dumps(ModelSpec(name="tiny", source="/models/tiny").to_dict()))
    for instance, node in (("tiny", "n1"), ("tiny:1", "n2"), ("tiny:2", "n3")):
        await store.put(keys.instance_key(instance), dumps(InstanceStatus(
            instance=instance, model="tiny", node=node, phase=Phase.STARTING, endpoint="", message="").to_dict()))
    await store.put(keys.log_access_key("n1"), dumps(LogAccess("n1", agent, TOKEN).to_dict()))
    await store.put(keys.log_access_key("n2"), b'{"node": "n2", "token": 42}')  # garbage: contained
    await store.put(keys.log_access_key("n3"), dumps(LogAccess("n3", agent, "W" * 43).to_dict()))  # wrong token
    caplog.set_level(logging.WARNING)
    cfg = GatewayConfig(load_poll_s=0, admin_key_hashes=(hashlib.sha256(ADMIN.encode()).hexdigest(),))
    app = build_gateway_app(cfg, store, CollectorRegistry())
    server = GatewayServer(app)
    await server.start_server()
    try:
        await until(lambda: app[GATEWAY].auth.synced and len(app[CONSOLE_LOGS].agents) == 2)
        base = str(server.make_url("/"))[:-1]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(base + "/ui/api/models/tiny/logs") as resp:
                assert resp.status == 401, "no session, no logs"
            async with http.post(base + "/ui/login", json={"key": ADMIN}) as resp:
                assert resp.status == 200
            async with http.get(base + "/ui/api/models/nope/logs") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
            async with http.get(base + "/ui/api/models/tiny/logs?lines=many") as resp:
                assert resp.status == 400
            async with http.get(base + "/ui/api/models/tiny/logs?lines=5") as resp:
                assert resp.status == 200 and resp.content_type == "text/event-stream"
                got = await events(resp, lambda ev: len([e for e in ev if e[0] == "unavailable"]) == 2
                                   and len(messages(ev)) == 2)
                assert got[0] == ("start", {"model": "tiny", "nodes": ["n1", "n2", "n3"]})
                assert messages(got) == [("n1", "tiny", "INFO 05-12 starting vLLM"),
                                         ("n1", "tiny", "ERROR 05-12 something failed")]
                reasons = {d["node"]: d["reason"] for k, d in got if k == "unavailable"}
                assert "no log access" in reasons["n2"] and "401" in reasons["n3"], reasons
                journal(jdir, "c", (1700000009.0, "nebula-engine@tiny.service", "live line", 4))
                later = await events(resp, lambda ev: bool(messages(ev)))
                assert messages(later) == [("n1", "tiny", "live line")]
                assert readers(jdir) == 1
            await until(lambda: readers(jdir) == 0, 10)  # the console went away: so did the agent's reader
        assert app[CONSOLE_LOGS].streams == 0
    finally:
        await server.close()
    bad = [r for r in caplog.records if "log access record" in r.getMessage()]
    assert len(bad) == 1, "the garbage record is named once"
