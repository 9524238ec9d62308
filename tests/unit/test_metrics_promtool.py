"""The real promtool (Debian's `prometheus` package) on what Nebula ships and serves:

- `promtool check metrics` on the /metrics of a gateway (forwarding to a fake engine), a leading scheduler
  and a node agent with GPU readings, each built in process on the in-memory store (the same checks on
  the real processes: tests/integration/test_prometheus.py);
- `promtool check config`, `check rules` and `test rules` on etc/prometheus/;
- every expression of etc/grafana/nebula.json parses (as a rule, through promtool), and every metric the
  dashboard and the rules name is one that some Nebula service (or vLLM) exposes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import GatewayConfig, NebulaConfig
from nebula.core.model import ModelSpec, NodeRecord, dumps
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.gpus import GpuCollector, GpuSampler
from nebula.services.agent.specfiles import SpecFiles
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from nebula.services.scheduler.scheduler import Scheduler
from tests.harness.gateway_server import GatewayServer
from tests.harness.mirrors import feed_scheduler, listing, mirrored
from tests.unit.fake_engine import FakeEngine, put_instance, until, vllm_metrics_text
from tests.unit.test_agent import TableUnits, model_dir, place_on
from tests.unit.test_metrics_gpu import BARE, H100

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "etc/prometheus"
DASHBOARD = ROOT / "etc/grafana/nebula.json"
PROMTOOL = "/usr/bin/promtool"  # Debian's prometheus package (scripts/test.sh installs it)


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    res = subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, cwd=cwd, timeout=60)
    out = (res.stdout + res.stderr).decode(errors="replace")
    assert res.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


# --- expositions of the three services, built in process ---------------------------------------------------

async def gateway_text() -> str:
    engine = FakeEngine("a")
    await engine.start()
    store = MemoryStore()
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/m").to_dict()))
    await put_instance(store, "m", engine.endpoint)
    registry = CollectorRegistry()
    server = GatewayServer(build_gateway_app(GatewayConfig(load_poll_s=0.05), store, registry))
    await server.start_server()
    try:
        state = server.app[GATEWAY]
        await until(lambda: bool(state.table.ready().get("m")))
        async with aiohttp.ClientSession() as http:
            for stream in (False, True):  # fills the latency, TTFT and inter-token histograms
                body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
                async with http.post(str(server.make_url("/v1/chat/completions")), json=body) as resp:
                    assert resp.status == 200
                    await resp.read()
        await until(lambda: "m" in state.table.loads.tokens.prompt)
        return generate_latest(registry).decode()
    finally:
        await server.close()
        await engine.stop()


async def scheduler_text() -> str:
    store, registry = MemoryStore(), CollectorRegistry()
    sched = Scheduler(store, "s1", lease_ttl_s=10, node_grace_s=30, resync_s=5, registry=registry)
    await store.put(keys.node_key("n1"), dumps(NodeRecord(name="n1", address="127.0.0.1", port_min=18000,
                                                          port_max=18100).to_dict()))
    await store.put(keys.model_key("big"), dumps(ModelSpec(name="big", source="/m", gpus_per_replica=1).to_dict()))
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/m").to_dict()))
    await feed_scheduler(store, sched)
    sched.on_nodes(mirrored(records.NODES))  # n1 leaves: a lost node's series
    task = asyncio.create_task(sched.run())
    try:
        await until(lambda: sched.is_leader and bool(sched.pending))
        sched.on_placements(mirrored(records.PLACEMENTS, await listing(store, keys.PLACEMENTS)))
        return generate_latest(registry).decode()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def agent_text(tmp: Path) -> str:
    store, units, registry = MemoryStore(), TableUnits(), CollectorRegistry()

    async def healthy(_: str) -> bool:
        return True

    agent = NodeAgent(NebulaConfig(), NodeRecord(name="n1", address="127.0.0.1", port_min=18000, port_max=18010),
                      store, units, SpecFiles(str(tmp / "run")), healthy, registry)
    sampler = GpuSampler(lambda: ((H100, BARE), ""), "n1")
    sampler.sample()
    registry.register(GpuCollector(sampler))
    await agent.on_new_lease(await store.grant_lease(10))
    await place_on(store, agent, "tiny", model_dir(tmp))
    await agent.reconcile_once()
    return generate_latest(registry).decode()


@pytest.fixture(scope="module")
def expositions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    async def build() -> dict[str, str]:
        return {"gateway": await gateway_text(), "scheduler": await scheduler_text(),
                "agent": await agent_text(tmp_path_factory.mktemp("agent"))}

    return asyncio.run(build())


@pytest.mark.parametrize("service", ["gateway", "scheduler", "agent"])
def test_exposition_passes_promtool_check_metrics(expositions: dict[str, str], service: str) -> None:
    text = expositions[service]
    promtool("check", "metrics", stdin=text.encode())
    # Not an empty pass: the series this task added are there, with samples.
    wanted = {"gateway": ["nebula_gateway_prompt_tokens_total{", "nebula_gateway_model_replicas_ready{"],
              "scheduler": ["nebula_scheduler_node_gone_seconds{", "nebula_scheduler_model_pending{",
                            "nebula_scheduler_placement_changes_total{"],
              "agent": ["nebula_gpu_power_watts{", "nebula_agent_instances{", "nebula_agent_reconcile_seconds_count",
                        "nebula_agent_gpu_memory_unreleased_bytes{", "nebula_agent_gpu_memory_release_overdue_total{"]}
    for prefix in wanted[service]:
        assert any(line.startswith(prefix) for line in text.splitlines()), prefix


# --- shipped configuration ---------------------------------------------------------------------------------

def test_shipped_prometheus_config_is_valid(tmp_path: Path) -> None:
    out = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "1 rule files found" in out


def test_shipped_rules_are_valid_and_pass_their_tests() -> None:
    promtool("check", "rules", str(PROMETHEUS / "nebula-rules.yml"))
    out = promtool("test", "rules", "nebula-rules.test.yml", cwd=PROMETHEUS)
    assert "SUCCESS" in out


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
    return exprs


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$model", ".*").replace("$node", ".*")


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)} for i, e in enumerate(dashboard_exprs())]}]}
    (tmp_path / "dash.rules.json").write_text(json.dumps(rules))  # YAML is a superset of JSON
    out = promtool("check", "rules", str(tmp_path / "dash.rules.json"))
    assert f"SUCCESS: {len(dashboard_exprs())} rules found" in out


def exposed_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        suffixes: dict[str, tuple[str, ...]] = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def named_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\b(nebula_[a-z0-9_]+|vllm:[a-z0-9_]+)", e)}


def test_dashboard_and_rules_name_only_metrics_that_exist(expositions: dict[str, str]) -> None:
    exposed = set().union(*(exposed_names(t) for t in expositions.values()), exposed_names(vllm_metrics_text("m")))
    rules_text = (PROMETHEUS / "nebula-rules.yml").read_text()
    rule_exprs = re.findall(r"expr: (.+(?:\n {10}.+)*)", rules_text)
    used: dict[str, Any] = {"dashboard": named_metrics(dashboard_exprs()), "rules": named_metrics(rule_exprs)}
    assert used["rules"] >= {"nebula_gateway_ttft_seconds_bucket", "nebula_gpu_memory_used_bytes",
                             "nebula_scheduler_node_gone_seconds"}
    for where, names in used.items():
        assert names <= exposed, f"{where} names metrics nothing exposes: {sorted(names - exposed)}"

