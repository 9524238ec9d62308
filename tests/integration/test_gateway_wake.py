"""Wake on request, the gateway's side, as it runs: `nebula gateway run` with two worker processes against a real
etcd, forwarding to a fake engine (no model needed: the gateway relays bytes). 200 concurrent first requests for
an elastic model at zero are all held and cause exactly one wake request; they complete once the test reports a
ready replica the way the scheduler and a node agent would (the end-to-end test with the real scheduler is the
integrator's); each worker publishes its load under /nebula/load/, which leaves with it (a clean exit or a
kill); a hold that runs out is 503 model_waking; a held stream gets keep-alive comments and the openai SDK
still parses it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from nebula.core import keys
from nebula.core.elastic import LoadReport, ScalingPolicy
from nebula.core.model import ModelSpec, dumps
from tests.harness.etcd import EtcdServer, etcd_get, etcd_list
from tests.harness.ports import free_port
from tests.integration.test_gateway_workers import children, etcd_put, until
from tests.unit.fake_engine import FakeEngine

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]
N = 200
WAKE_WAIT_S = 6.0


def chat(model: str, stream: bool = False) -> bytes:
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()


def load_reports(etcd: EtcdServer) -> list[LoadReport]:
    return [LoadReport.from_dict(json.loads(kv["value"])) for kv in etcd_list(etcd.endpoints, keys.LOAD)]


def held(etcd: EtcdServer, model: str) -> int:
    return sum(r.models[model].held for r in load_reports(etcd) if model in r.models)


async def wakes_requested(http: aiohttp.ClientSession, etcd: EtcdServer) -> float:
    """The wake requests counted by every worker, from each one's own /metrics (registered in etcd)."""
    total = 0.0
    for kv in etcd_list(etcd.endpoints, keys.SERVICES + "gateway/"):
        async with http.get(f"http://{kv['key'].rsplit('/', 1)[1]}/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("nebula_gateway_wakes_requested_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine("e1")
    await fake.start()
    yield fake
    await fake.stop()


async def test_many_first_requests_cause_one_wake_and_complete_when_a_replica_is_ready(
        tmp_path: Path, engine: FakeEngine) -> None:
    etcd = EtcdServer.launch(tmp_path / "etcd")
    port = free_port()
    config = tmp_path / "nebula.toml"
    config.write_text(f'[cluster]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl_s = 5\n\n'
                      f'[gateway]\nport = {port}\nworkers = 2\nadmin_key_digest_file = ""\nload_poll_s = 0.5\n'
                      f'load_report_s = 0.3\nwake_wait_s = {WAKE_WAIT_S}\nwake_keepalive_s = 0.2\n')
    policy = ScalingPolicy(min_replicas=0, max_replicas=1, idle_unload_s=300)
    for name in ("z", "y"):
        etcd_put(etcd.endpoint, keys.model_key(name), dumps(ModelSpec(name=name, source=f"/models/{name}",
                                                                      scaling=policy).to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_") and k != "NOTIFY_SOCKET"}
    env.update(NEBULA_CONFIG=str(config), PYTHONPATH=str(ROOT))
    log = (tmp_path / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "nebula", "gateway", "run", env=env,
                                                stdout=log, stderr=log, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
            await until(lambda: len(load_reports(etcd)) == 2, 60, "both workers' load reports")
            # Health checks and scrapes are no inference requests: they leave last_request alone.
            for _ in range(5):
                for path in ("/healthz", "/metrics", "/v1/models"):
                    async with http.get(base + path) as resp:
                        assert resp.status == 200, path
            await asyncio.sleep(1.0)  # a few reports later
            assert all(m.last_request == 0 for r in load_reports(etcd) for m in r.models.values())
            async with http.get(base + "/v1/models") as resp:
                assert {m["id"]: m["state"] for m in (await resp.json())["data"]} == {"y": "idle", "z": "idle"}

            async def ask() -> tuple[int, Any]:
                async with http.post(base + "/v1/chat/completions", data=chat("z"),
                                     headers={"Content-Type": "application/json"}) as resp:
                    return resp.status, await resp.json()

            started = time.monotonic()
            calls = [asyncio.create_task(ask()) for _ in range(N)]
            await until(lambda: held(etcd, "z") == N, WAKE_WAIT_S - 1, f"{N} requests held (in the load reports)")
            wake = etcd_get(etcd.endpoints, keys.wake_key("z"))
            assert wake is not None and wake["version"] == 1 and wake["lease"] == 0  # one put, ever
            assert await wakes_requested(http, etcd) == 1
            assert not any(c.done() for c in calls)

            # What the scheduler leader and the node agent would write once the replica is up.
            ready_at = time.monotonic()
            etcd_put(etcd.endpoint, keys.instance_key("z:1"), dumps({
                "instance": "z:1", "model": "z", "node": "n1", "phase": "ready", "endpoint": engine.endpoint}))
            answers = await asyncio.gather(*calls)
            wake_s, release_s = time.monotonic() - started, time.monotonic() - ready_at
            assert [s for s, _ in answers] == [200] * N, [a for s, a in answers if s != 200][:3]
            assert all(a["choices"][0]["message"]["content"] == "hello from e1" for _, a in answers)
            print(f"{N} held requests answered {wake_s:.2f}s after the first arrived, {release_s:.2f}s after the "
                  "replica was reported ready")
            # The reports catch up: nothing held or in flight any more, and both workers saw requests (the
            # kernel spread the connections over them).
            await until(lambda: all(r.models["z"].held == r.models["z"].inflight == 0 < r.models["z"].last_request
                                    for r in load_reports(etcd)), 10, "reports after the wake")

            # A hold that runs out: 503 model_waking with Retry-After, in the OpenAI shape.
            async with http.post(base + "/v1/chat/completions", data=chat("y"), headers={
                    "Content-Type": "application/json", "X-Nebula-Wake-Keepalive": "0"}) as resp:
                body = await resp.json()
                assert resp.status == 503 and resp.headers["Retry-After"], body
                assert body["error"]["code"] == "model_waking" and "waking up" in body["error"]["message"]

            # A held stream: keep-alive comments first, then the engine's events; the SDK reads the tokens.
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            stream = await client.chat.completions.create(model="y", messages=[{"role": "user", "content": "hi"}],
                                                          stream=True)
            await asyncio.sleep(0.6)
            etcd_put(etcd.endpoint, keys.instance_key("y:1"), dumps({
                "instance": "y:1", "model": "y", "node": "n1", "phase": "ready", "endpoint": engine.endpoint}))
            assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "hello from e1"
            await client.close()

        # A worker that dies leaves no report behind: its lease expires (TTL 5 s) and its successor reports.
        workers = children(proc.pid)
        victim = min(workers)
        assert any(r.reporter.endswith(f".{victim}") for r in load_reports(etcd))
        os.kill(victim, signal.SIGKILL)
        await until(lambda: not any(r.reporter.endswith(f".{victim}") for r in load_reports(etcd)), 20,
                    "the killed worker's report gone with its lease")
        await until(lambda: len(load_reports(etcd)) == 2, 30, "the new worker's report")

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 40) == 0
        assert etcd_list(etcd.endpoints, keys.LOAD) == []  # the reports left with their workers' leases
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        etcd.stop()
        print((tmp_path / "gateway.log").read_text()[-3000:])
