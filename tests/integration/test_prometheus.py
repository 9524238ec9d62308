"""A real Prometheus (Debian's package) scraping a running Nebula through the gateway's service discovery,
with the shipped etc/prometheus/ config and rules; and `promtool check metrics` on every running service.

The cluster is the session's `api_cluster` (gateway, scheduler, node agent, and the vLLM CPU engines of every
model in api_fixtures.REPLICAS). Prometheus runs with the shipped prometheus.yml, changed only where a test
must: the gateway's URL, a credentials file, and 1 s intervals instead of 15 s and 30 s.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import post_json
from tests.harness.ports import free_port
from tests.integration.api_fixtures import CHAT_MODEL, INSTANCES, REPLICAS, ApiCluster

pytestmark = [pytest.mark.engine, pytest.mark.etcd]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = "/usr/bin/prometheus"  # Debian's prometheus package (scripts/test.sh installs it)
PROMTOOL = "/usr/bin/promtool"
MODELS = set(REPLICAS)
ENGINES = len(INSTANCES)
SERVICES = ["nebula-gateway", "nebula-node", "nebula-scheduler"]


def get_json(url: str, timeout_s: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def get_text(url: str) -> str:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "identity"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


def eventually(check: Callable[[], Any], timeout_s: float, what: str, log: Path | None = None) -> Any:
    """Poll `check` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    detail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})\n{detail}")


def sd_document(api_cluster: ApiCluster) -> list[dict[str, Any]]:
    doc = get_json(api_cluster.gateway_url + "/v1/admin/prometheus/sd")
    assert isinstance(doc, list)
    return doc


def test_sd_lists_every_service_and_engine_of_the_running_cluster(api_cluster: ApiCluster) -> None:
    doc = sd_document(api_cluster)
    jobs = sorted(g["labels"]["job"] for g in doc)
    assert jobs == ["nebula-engine"] * ENGINES + SERVICES, doc
    engines = {g["labels"]["instance"]: g for g in doc if g["labels"]["job"] == "nebula-engine"}
    assert set(engines) == INSTANCES
    for instance, group in engines.items():
        assert group["labels"]["model"] == instance.partition(":")[0] and group["labels"]["node"] == "node-a"
    gateway = next(g for g in doc if g["labels"]["job"] == "nebula-gateway")
    assert gateway["targets"] == [f"127.0.0.1:{api_cluster.cluster.ports['gateway']}"]


def test_every_running_service_passes_promtool_check_metrics(api_cluster: ApiCluster) -> None:
    services = [g for g in sd_document(api_cluster) if g["labels"]["job"] != "nebula-engine"]
    assert len(services) == 3
    for group in services:
        text = get_text(f"http://{group['targets'][0]}/metrics")
        res = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert res.returncode == 0, f"{group['labels']['job']}: {(res.stdout + res.stderr).decode()}"
        assert f"nebula_{group['labels']['service'].replace('node', 'agent')}_" in text
        # The collector's own figures (runtime.settle_heap tunes it), on each service's registry.
        assert 'python_gc_collections_total{generation="0"}' in text


@dataclass
class Prometheus:
    url: str
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def eventually(self, promql: str, what: str, timeout_s: float = 60) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = eventually(lambda: self.query(promql), timeout_s, what, self.log)
        return result


def shipped_config_for(gateway_url: str, key_file: Path) -> str:
    """The shipped prometheus.yml, pointed at this gateway, with test-speed intervals."""
    text = (ROOT / "etc/prometheus/prometheus.yml").read_text()
    for old, new in (("http://127.0.0.1:8000", gateway_url),
                     ("credentials_file: /etc/prometheus/nebula.key", f"credentials_file: {key_file}"),
                     ("scrape_interval: 15s", "scrape_interval: 1s"),
                     ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                     ("refresh_interval: 30s", "refresh_interval: 1s")):
        assert text.count(old) == 1, f"the shipped prometheus.yml no longer has {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def prometheus(api_cluster: ApiCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    work = tmp_path_factory.mktemp("prometheus")
    key = work / "nebula.key"
    key.write_text("any-token\n")  # the test cluster has no keys: the admin API is open, any token passes
    (work / "prometheus.yml").write_text(shipped_config_for(api_cluster.gateway_url, key))
    shutil.copy(ROOT / "etc/prometheus/nebula-rules.yml", work / "nebula-rules.yml")
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        eventually(lambda: _ready(url), 60, "prometheus ready", log)
        yield Prometheus(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_prometheus_scrapes_engines_and_nebula_through_discovery(prometheus: Prometheus,
                                                                  api_cluster: ApiCluster) -> None:
    def all_up() -> list[dict[str, Any]] | None:
        targets = get_json(prometheus.url + "/api/v1/targets?state=active")["data"]["activeTargets"]
        ok = len(targets) == ENGINES + len(SERVICES) and all(t["health"] == "up" for t in targets)
        return targets if ok else None

    targets = eventually(all_up, 90, f"{ENGINES + len(SERVICES)} healthy targets (3 services, every engine)",
                         prometheus.log)
    assert sorted(t["labels"]["job"] for t in targets) == ["nebula-engine"] * ENGINES + SERVICES

    # vLLM's own series, labelled by discovery with the Nebula model, instance and node.
    running = prometheus.eventually('vllm:num_requests_running{job="nebula-engine"}', "vLLM series")
    assert {r["metric"]["model"] for r in running} == MODELS
    assert all(r["metric"]["node"] == "node-a" and r["metric"]["service"] == "engine" for r in running)
    assert {r["metric"]["instance"] for r in running} == INSTANCES

    # Nebula's own series, from each service.
    assert prometheus.eventually("nebula_scheduler_leader == 1", "a leading scheduler")
    ready = prometheus.eventually('nebula_agent_instances{phase="ready"} >= 1', "ready instances on the node")
    assert {r["metric"]["model"] for r in ready} == MODELS
    replicas = prometheus.eventually("nebula_gateway_model_replicas_ready >= 1", "ready replicas per model")
    assert {r["metric"]["model"] for r in replicas} == MODELS

    # A chat request: the gateway counts its tokens from the engine's counters, and Prometheus sees them.
    status, _ = post_json(api_cluster.base_url + "/chat/completions", {
        "model": CHAT_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "count to three"}]})
    assert status == 200
    prometheus.eventually(f'nebula_gateway_generation_tokens_total{{model="{CHAT_MODEL}"}} > 0', "generated tokens")
    prometheus.eventually(f'nebula_gateway_prompt_tokens_total{{model="{CHAT_MODEL}"}} > 0', "prompt tokens")
    picks = prometheus.eventually(f'nebula_gateway_picks_total{{model="{CHAT_MODEL}"}}', "picks")
    # The shipped metric_relabel_configs: the gateway's own `instance` label is stored as `replica`.
    assert all(p["metric"]["replica"] == CHAT_MODEL and "exported_instance" not in p["metric"] for p in picks)


def test_shipped_rules_evaluate_cleanly_on_live_data(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = get_json(prometheus.url + "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = eventually(evaluated, 60, "every rule evaluated at least once", prometheus.log)
    shipped = re.findall(r"^\s*- (?:alert|record):", (ROOT / "etc/prometheus/nebula-rules.yml").read_text(), re.M)
    assert len(rules) == len(shipped) >= 22, "every shipped rule is loaded"
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # Recorded from live series: the pipeline from the engines' counters to a rule works end to end.
    assert {r["metric"]["model"] for r in prometheus.eventually("nebula:model_replicas_ready", "recorded")} == MODELS
    # Pending is expected while the first scrapes arrive (absent() holds until then); firing is not.
    firing = {a["metric"]["alertname"] for a in prometheus.query('ALERTS{alertstate="firing"}')}
    assert not firing & {"NebulaEngineDown", "NebulaModelNoReadyReplica", "NebulaNoSchedulerLeader",
                         "NebulaServiceDown", "NebulaNodeLost"}, firing
