"""The walking skeleton, end to end on real parts: etcd, the four services, vLLM on CPU, the openai client.

load -> placed -> engine started -> ready -> chat (stream and not) -> agent restart is a non-event ->
bad input -> a load with a missing source fails visibly without disturbing the rest -> unload drains.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness.cluster import NebulaCluster, post_json, required_path, running_cluster, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.etcd]
READY_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NebulaCluster]:
    with running_cluster(tmp_path_factory.mktemp("e2e"), tmp_path_factory.mktemp("e2e-etcd")) as c:
        yield c


def model_entry(c: NebulaCluster, name: str) -> dict[str, Any] | None:
    for m in c.models():
        if m["name"] == name:
            return dict(m)
    return None


def test_load_chat_readopt_unload(cluster: NebulaCluster) -> None:
    models = Path(required_path("NEBULA_TEST_MODELS"))
    chat_model = models / "tiny-llama"
    t0 = time.monotonic()
    cluster.cli("load", "tiny", "--source", str(chat_model), "--max-model-len", "512")

    def ready() -> bool:
        m = model_entry(cluster, "tiny")
        return m is not None and m["ready"] >= 1

    wait_until(ready, READY_TIMEOUT_S, "tiny ready", cluster, interval_s=1.0)
    t_ready = time.monotonic() - t0
    listing = cluster.cli("list").stdout
    assert "tiny" in listing and "ready" in listing and "node-a" in listing

    client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0)
    assert "tiny" in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8)
    t_first = time.monotonic() - t0
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) >= 2 and "".join(pieces)
    print(f"\nE2E: load->ready {t_ready:.1f} s, load->first chat completion {t_first:.1f} s")

    # An agent restart is a non-event: the engine keeps its pid and keeps serving.
    pids = cluster.engine_pids()
    cluster.kill("node", signal.SIGKILL)
    cluster.start("node")
    time.sleep(3)  # let the new agent run a few passes; nothing may restart
    assert cluster.engine_pids() == pids
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "again"}],
                                          max_tokens=4).choices[0].message.content is not None

    # Bad input gets OpenAI-shaped errors, never a 500.
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert nf.value.status_code == 404
    status, body = post_json(cluster.gateway_url + "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and body["error"]["message"]

    # A model whose source does not exist: accepted, then failed with the reason; tiny is undisturbed.
    cluster.cli("load", "ghost", "--source", "/nonexistent/ghost-model")

    def ghost_failed() -> bool:
        m = model_entry(cluster, "ghost")
        return m is not None and any(i["phase"] == "failed" for i in m["instances"])

    wait_until(ghost_failed, 30, "ghost failed", cluster)
    ghost = model_entry(cluster, "ghost")
    assert ghost is not None and "/nonexistent/ghost-model does not exist" in ghost["instances"][0]["message"]
    assert "does not exist" in cluster.cli("list").stdout
    assert cluster.engine_pids() == pids
    cluster.cli("unload", "ghost")

    # Unload drains and stops the engine; the instance leaves etcd and /v1/models.
    engine_pid = pids["tiny"]
    cluster.cli("unload", "tiny")
    wait_until(lambda: model_entry(cluster, "tiny") is None, 60, "tiny gone", cluster)
    assert "tiny" not in [m.id for m in client.models.list().data]
    wait_until(lambda: not Path(f"/proc/{engine_pid}").exists(), 30, "engine process gone", cluster)
