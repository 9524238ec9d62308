"""A model from a hub, end to end: `nebula pull tiny/llama` fetches it through a local Hugging Face mirror
into node-a's cache (the real huggingface_hub code), node-a advertises it, `nebula load --source
hf://tiny/llama` starts a real vLLM engine from the cache without downloading again, and chat works through
the gateway. One engine start (~2 min on the shared CPU).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness.cluster import required_path, running_cluster, wait_until
from tests.harness.hub_mirror import running_mirror, tiny_repos

pytestmark = [pytest.mark.engine, pytest.mark.etcd]
READY_TIMEOUT_S = 420


def admin_model(gateway: str, name: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{gateway}/v1/admin/models/{name}", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def test_pull_then_load_from_the_hub_and_chat(tmp_path: Path) -> None:
    repos = tiny_repos(Path(required_path("NEBULA_TEST_MODELS")))
    for d in ("c", "etcd"):
        (tmp_path / d).mkdir()
    with running_mirror(repos) as mirror, running_cluster(
            tmp_path / "c", tmp_path / "etcd", extra_env={"NEBULA_NODE_HF_ENDPOINT": mirror.url}) as cluster:
        pulled = cluster.cli("pull", "tiny/llama", "--timeout", "120")
        assert pulled.stdout.splitlines()[-1] == "hf://tiny/llama is cached on node-a", pulled.stdout
        assert mirror.file_requests("tiny/llama") == 6
        weights = mirror.weight_downloads("tiny/llama")
        assert weights >= 1
        with urllib.request.urlopen(cluster.gateway_url + "/v1/admin/nodes", timeout=10) as resp:
            nodes = json.loads(resp.read())["data"]
        assert [n["cached"] for n in nodes] == [["hf://tiny/llama"]]

        bad = cluster.cli("pull", "tiny/nope", check=False)
        assert bad.returncode == 1
        assert "hf://tiny/nope: no such repo on the hub" in bad.stderr

        cluster.cli("load", "llama", "--source", "hf://tiny/llama", "--max-model-len", "512")
        wait_until(lambda: admin_model(cluster.gateway_url, "llama")["ready"] == 1, READY_TIMEOUT_S, "llama ready",
                   cluster, interval_s=1.0)
        assert admin_model(cluster.gateway_url, "llama")["pending_reason"] is None
        # The gateway read the model's profile from the hub (config files, and the safetensors header by range),
        # and the node used the pulled weights: no weight file was fetched again.
        assert mirror.weight_downloads("tiny/llama") == weights, "the load must use the pulled weights"
        profile = admin_model(cluster.gateway_url, "llama")["spec"]["profile"]
        assert profile["architecture"] == "LlamaForCausalLM" and profile["weight_bytes"] > 0, profile

        client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=8)
        assert chat.choices[0].message.content
        spec = json.loads((cluster.run_dir / "engines" / "llama.json").read_text())
        assert spec["source"].startswith(str(tmp_path / "c" / "cache" / "hf" / "models--tiny--llama" / "snapshots"))
