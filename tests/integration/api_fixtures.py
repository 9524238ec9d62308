"""One Nebula with six real vLLM CPU engines (chat, embed, rerank, two of pair, speech), shared by the whole test
session.

An engine start is the expensive part (~50 s alone, ~145 s for three at once on 2 cores), so the session
pays it once: `api_cluster` loads all three models through the CLI (the admin API), then waits for all of
them. Register it in tests/integration/conftest.py:

    from tests.integration.api_fixtures import api_cluster  # noqa: E402, F401
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import NebulaCluster, required_path
from tests.harness.etcd import EtcdServer
from tests.harness.otlp import ThreadedOtlpReceiver

CHAT_MODEL = "chat"
EMBED_MODEL = "embed"
RERANK_MODEL = "rerank"
# Two replicas of the tiny chat model with runtime LoRA on: what the Responses API (a stored response lives in
# one replica) and LoRA adapters (loaded on every replica of their base) are tested against.
PAIR_MODEL = "pair"
PAIR_REPLICAS = 2
# A tiny random Whisper (scripts/make_tiny_models.py): /v1/audio/transcriptions and /translations.
SPEECH_MODEL = "speech"
MAX_MODEL_LEN = 512
READY_TIMEOUT_S = 600
# Every model the cluster serves, with its replica count, and the engine instances they run as (replica 0 is
# named after its model, the others `model:N`): what a test that looks at the whole cluster expects.
REPLICAS = {CHAT_MODEL: 1, EMBED_MODEL: 1, RERANK_MODEL: 1, PAIR_MODEL: PAIR_REPLICAS, SPEECH_MODEL: 1}
INSTANCES = frozenset(m if n == 0 else f"{m}:{n}" for m, count in REPLICAS.items() for n in range(count))

# The chat model is loaded as a newcomer would, with no engine flags: its profile (the `nebula-tiny` family of
# etc/nebula/profiles.toml, matched by the gateway from the model's files) turns on tool calling and structured
# outputs with no free whitespace, which is what makes a random model complete forced tool calls and JSON
# (see shared/notes/engine.md). These tests are what prove that path.
CHAT_FAMILY = "nebula-tiny"


@dataclass(frozen=True)
class ApiCluster:
    cluster: NebulaCluster
    ready_s: float  # from the first load to every replica of every model ready
    traces: ThreadedOtlpReceiver  # where the gateway and the engines export their spans

    @property
    def gateway_url(self) -> str:
        return self.cluster.gateway_url

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as base_url."""
        return self.cluster.gateway_url + "/v1"


def _load_commands(models: Path) -> dict[str, list[str]]:
    chat = ["load", CHAT_MODEL, "--source", str(models / "tiny-llama"), "--task", "generate",
            "--max-model-len", str(MAX_MODEL_LEN)]
    embed = ["load", EMBED_MODEL, "--source", str(models / "tiny-bert-embed"), "--task", "embed"]
    rerank = ["load", RERANK_MODEL, "--source", str(models / "tiny-bert-rerank"), "--task", "rerank"]
    pair = ["load", PAIR_MODEL, "--source", str(models / "tiny-llama"), "--task", "generate",
            "--max-model-len", str(MAX_MODEL_LEN), "--replicas", str(PAIR_REPLICAS),
            "--engine-arg=--enable-lora", "--engine-arg=--max-lora-rank=8", "--engine-arg=--max-loras=2"]
    # No --task: that a Whisper is a transcribe model is read from its files (model_facts), which is under test.
    speech = ["load", SPEECH_MODEL, "--source", str(models / "tiny-whisper")]
    commands = {CHAT_MODEL: chat, EMBED_MODEL: embed, RERANK_MODEL: rerank, PAIR_MODEL: pair, SPEECH_MODEL: speech}
    assert set(commands) == set(REPLICAS)
    return commands


def _admin_models(cluster: NebulaCluster) -> dict[str, dict[str, Any]]:
    """GET /v1/admin/models by name (plain HTTP: no CLI process per poll while engines compete for CPU)."""
    with urllib.request.urlopen(cluster.gateway_url + "/v1/admin/models", timeout=10) as resp:
        data = json.loads(resp.read())["data"]
    return {m["name"]: m for m in data}


def wait_all_ready(cluster: NebulaCluster, names: list[str], timeout_s: float) -> None:
    """Poll until every model has all its replicas ready; fail at once, with the logs, when an instance fails."""
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        models = _admin_models(cluster)
        for name in list(pending):
            entry = models.get(name)
            if entry is None:
                continue
            if entry["ready"] >= entry["spec"]["replicas"]:
                pending.remove(name)
                continue
            failed = [i for i in entry["instances"] if i["phase"] == "failed"]
            if failed:
                pytest.fail(f"model {name} failed to start: {failed[0]['message']}\n{cluster.logs()}")
        if pending and time.monotonic() > deadline:
            phases = {n: [i["phase"] for i in models.get(n, {}).get("instances", [])] for n in pending}
            pytest.fail(f"models not ready after {timeout_s:.0f} s: {phases}\n{cluster.logs()}")
        if pending:
            time.sleep(1.0)


@pytest.fixture(scope="session")
def api_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiCluster]:
    """A Nebula serving `chat` (tiny-llama, forced tool calls), `embed` and `rerank` from real vLLM engines."""
    venv = required_path("NEBULA_TEST_VLLM_VENV")
    models = Path(required_path("NEBULA_TEST_MODELS"))
    etcd = EtcdServer.launch(tmp_path_factory.mktemp("api-etcd"))
    traces = ThreadedOtlpReceiver()
    tracing = f'\n[tracing]\notlp_endpoint = "{traces.start()}"\n'
    cluster = NebulaCluster(workdir=tmp_path_factory.mktemp("api"), etcd=etcd, vllm_venv=venv,
                            extra_config=tracing)
    try:
        cluster.up()
        t0 = time.monotonic()
        commands = _load_commands(models)
        for argv in commands.values():  # load all three, then wait for all: the engines start together
            cluster.cli(*argv)
        wait_all_ready(cluster, list(commands), READY_TIMEOUT_S)
        ready_s = time.monotonic() - t0
        print(f"\napi_cluster: {', '.join(commands)} ready {ready_s:.1f} s after the first load")
        yield ApiCluster(cluster=cluster, ready_s=ready_s, traces=traces)
    finally:
        cluster.down()
        etcd.stop()
        traces.stop()
