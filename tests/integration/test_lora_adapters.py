"""LoRA adapters at runtime, end to end on real vLLM CPU engines: `nebula adapter add` -> the agent loads it on
both replicas of `pair` -> the real `openai` SDK talks to it by name -> an engine restart gets it again ->
`nebula adapter rm` unloads it; bad adapters are refused clearly (a base without --enable-lora, a rank above
--max-lora-rank, files the engine cannot load).

The adapters are built by scripts/make_tiny_models.py: tiny-llama-lora (rank 4) and tiny-llama-lora-r16.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.harness.cluster import NebulaCluster, post_json, required_path, wait_until
from tests.integration.api_fixtures import CHAT_MODEL, PAIR_MODEL, PAIR_REPLICAS, ApiCluster, wait_all_ready

ADAPTER = "tone"
PAIR_INSTANCES = {PAIR_MODEL, *(f"{PAIR_MODEL}:{i}" for i in range(1, PAIR_REPLICAS))}
LOAD_TIMEOUT_S = 120
RESTART_TIMEOUT_S = 420
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something about the sea."}]


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def adapters(cluster: NebulaCluster) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in get(cluster.gateway_url + "/v1/admin/adapters")["data"]}


def pair_endpoints(cluster: NebulaCluster) -> dict[str, str]:
    """Each pair instance's engine endpoint, as its agent reports it."""
    entry = get(cluster.gateway_url + f"/v1/admin/models/{PAIR_MODEL}")
    return {i["instance"]: i["endpoint"] for i in entry["instances"]}


def engine_adapters(endpoint: str) -> dict[str, str]:
    """What the engine itself says it has loaded: its own /v1/models, adapter -> parent."""
    return {m["id"]: m["parent"] for m in get(endpoint + "/v1/models")["data"] if m.get("parent")}


def loaded_on(cluster: NebulaCluster, name: str) -> set[str]:
    entry = adapters(cluster).get(name)
    return set(entry["loaded_on"]) if entry else set()


@pytest.fixture(scope="module")
def client(api_cluster: ApiCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_cluster.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def lora_dir() -> Path:
    return Path(required_path("NEBULA_TEST_MODELS"))


@pytest.fixture
def cluster(api_cluster: ApiCluster) -> Iterator[NebulaCluster]:
    """The shared cluster, left with no adapters and `pair` ready, whatever the test did."""
    yield api_cluster.cluster
    for name in adapters(api_cluster.cluster):
        api_cluster.cluster.cli("adapter", "rm", name, check=False)
    wait_all_ready(api_cluster.cluster, [PAIR_MODEL], RESTART_TIMEOUT_S)


def chat(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0, seed=1)
    assert answer.model == model
    return answer.choices[0].message.content or ""


def test_an_adapter_is_loaded_on_every_replica_served_by_name_reloaded_after_a_restart_and_unloaded(
        cluster: NebulaCluster, client: openai.OpenAI, lora_dir: Path) -> None:
    t0 = time.monotonic()
    out = cluster.cli("adapter", "add", PAIR_MODEL, ADAPTER, "--source", str(lora_dir / "tiny-llama-lora"))
    assert f"adapter {ADAPTER} added on {PAIR_MODEL}" in out.stdout
    wait_until(lambda: loaded_on(cluster, ADAPTER) == PAIR_INSTANCES, LOAD_TIMEOUT_S,
               "the adapter loaded on both replicas", cluster, interval_s=0.5)
    print(f"\nadapter loaded on {len(PAIR_INSTANCES)} replicas {time.monotonic() - t0:.1f} s after `adapter add`")
    endpoints = pair_endpoints(cluster)
    for endpoint in endpoints.values():
        assert engine_adapters(endpoint) == {ADAPTER: PAIR_MODEL}
    listed = cluster.cli("adapter", "ls").stdout
    assert ADAPTER in listed and f"{PAIR_REPLICAS}/{PAIR_REPLICAS}" in listed, listed

    # Served by name through the real SDK, and it is the adapter answering: greedy decoding differs from
    # the base's (the adapter's B matrices are not zero).
    base_text, adapter_text = chat(client, PAIR_MODEL), chat(client, ADAPTER)
    assert adapter_text and adapter_text != base_text, (base_text, adapter_text)
    models = {m.id: m for m in client.models.list().data}
    assert ADAPTER in models
    extra = models[ADAPTER].model_extra or {}
    assert extra["parent"] == PAIR_MODEL and extra["root"] == str(lora_dir / "tiny-llama-lora")
    assert extra["ready"] == PAIR_REPLICAS
    assert client.models.retrieve(ADAPTER).id == ADAPTER

    # One engine dies: while it is away the adapter's requests go to the replica that has it; the new
    # engine gets the adapter as soon as it is up.
    victim = f"{PAIR_MODEL}:1"
    old_pid = cluster.engine_pids()[victim]
    os.killpg(old_pid, signal.SIGKILL)
    wait_until(lambda: loaded_on(cluster, ADAPTER) == {PAIR_MODEL}, 60, "the dead replica out of loaded_on",
               cluster, interval_s=0.5)
    assert chat(client, ADAPTER) != base_text  # served by the surviving replica, which has it
    died = time.monotonic()
    wait_until(lambda: loaded_on(cluster, ADAPTER) == PAIR_INSTANCES, RESTART_TIMEOUT_S,
               "the adapter loaded again on the restarted engine", cluster, interval_s=1.0)
    print(f"adapter loaded on the restarted engine {time.monotonic() - died:.1f} s after the kill")
    assert cluster.engine_pids()[victim] != old_pid
    assert engine_adapters(pair_endpoints(cluster)[victim]) == {ADAPTER: PAIR_MODEL}
    assert chat(client, ADAPTER) != base_text

    # Removed: unloaded from the engines themselves, and the name is unknown again.
    cluster.cli("adapter", "rm", ADAPTER)
    wait_until(lambda: all(not engine_adapters(e) for e in pair_endpoints(cluster).values()), LOAD_TIMEOUT_S,
               "the adapter unloaded from both engines", cluster, interval_s=0.5)
    with pytest.raises(openai.NotFoundError):
        chat(client, ADAPTER)
    assert ADAPTER not in {m.id for m in client.models.list().data}


def test_adapters_the_engines_cannot_serve_are_refused_clearly(cluster: NebulaCluster, lora_dir: Path,
                                                               tmp_path: Path) -> None:
    lora = str(lora_dir / "tiny-llama-lora")
    no_lora = cluster.cli("adapter", "add", CHAT_MODEL, "plain", "--source", lora, check=False)
    assert no_lora.returncode == 2, no_lora
    assert "--enable-lora" in no_lora.stderr and len(no_lora.stderr.strip().splitlines()) == 1, no_lora.stderr

    too_big = cluster.cli("adapter", "add", PAIR_MODEL, "big", "--source", str(lora_dir / "tiny-llama-lora-r16"),
                          check=False)
    assert too_big.returncode == 2, too_big
    assert "rank 16" in too_big.stderr and "--max-lora-rank" in too_big.stderr, too_big.stderr

    unknown = cluster.cli("adapter", "add", "no-such-model", "orphan", "--source", lora, check=False)
    assert unknown.returncode == 3 and "no-such-model" in unknown.stderr, unknown

    taken = cluster.cli("adapter", "add", PAIR_MODEL, CHAT_MODEL, "--source", lora, check=False)
    assert taken.returncode == 1 and "name" in taken.stderr, taken

    # Files the gateway can vouch for but the engine cannot load (no weights): the engine's own message is
    # reported per replica, and the agents keep going.
    broken = tmp_path / "broken-lora"
    broken.mkdir()
    shutil.copy(lora_dir / "tiny-llama-lora" / "adapter_config.json", broken)
    broken.chmod(0o755)
    cluster.cli("adapter", "add", PAIR_MODEL, "broken", "--source", str(broken))
    wait_until(lambda: set(adapters(cluster)["broken"]["errors"]) == PAIR_INSTANCES, LOAD_TIMEOUT_S,
               "the engines' refusal reported on both replicas", cluster, interval_s=0.5)
    entry = adapters(cluster)["broken"]
    assert entry["loaded_on"] == []
    print(f"\nengine's refusal as reported: {entry['errors'][PAIR_MODEL]}")
    assert all(message for message in entry["errors"].values())
    status, body = post_json(cluster.gateway_url + "/v1/chat/completions",
                        {"model": "broken", "messages": PROMPT, "max_tokens": 4})
    assert status == 503 and body["error"]["code"] == "model_not_ready", body
    assert "broken" in cluster.cli("adapter", "ls").stdout
    cluster.cli("adapter", "rm", "broken")

