"""A load through the admin API: the catalog, the model's profile from its own files, sizing, and refusals.

A real gateway on an in-memory store; the model directories are the config fixtures of real models (no
weights: their safetensors index says how large the weights are) and the locally built tiny models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from nebula.core import keys
from nebula.core.config import CatalogConfig
from nebula.core.model import Gpu, ModelSpec, NodeRecord
from nebula.services.catalog_files import load_catalog
from tests.unit.served_gateway import ADMIN_KEY, ServedGateway, served_gateway

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
FIXTURES = Path(__file__).parent.parent / "fixtures" / "model-configs"
H100 = 81_559  # MiB, as NVML reports an H100 80GB


@pytest.fixture
def gateway() -> Iterator[ServedGateway]:
    with served_gateway(catalog=load_catalog(CatalogConfig())) as gw:
        yield gw


def load(gw: ServedGateway, **body: Any) -> requests.Response:
    return requests.post(gw.url + "/v1/admin/models", json=body, headers=AUTH, timeout=30)


def join(gw: ServedGateway, name: str, *gpu_mib: int) -> None:
    node = NodeRecord(name=name, address="10.0.0.1", port_min=18000, port_max=18100,
                      gpus=tuple(Gpu(index=i, name="NVIDIA H100 80GB HBM3", memory_total_mib=m, memory_used_mib=0)
                                 for i, m in enumerate(gpu_mib)))
    gw.put(keys.node_key(name), node.to_dict())


def stored(gw: ServedGateway, name: str) -> ModelSpec:
    kv = gw.run(gw.store.get(keys.model_key(name)))
    assert kv is not None, f"model {name} was not stored"
    return ModelSpec.from_dict(json.loads(kv.value))


def test_the_tiny_model_gets_its_family_flags_and_a_same_request_writes_nothing(gateway: ServedGateway) -> None:
    source = os.path.join(os.environ["NEBULA_TEST_MODELS"], "tiny-llama")
    first = load(gateway, name="tiny", source=source)
    assert first.status_code == 200, first.text
    spec = stored(gateway, "tiny")
    assert spec.profile is not None and spec.profile.family == "nebula-tiny"
    assert spec.profile.architecture == "LlamaForCausalLM"
    assert "--tool-call-parser=pythonic" in spec.profile.family_args()
    assert spec.gpus_per_replica == 0, "a fleet without GPUs runs it on CPUs"
    again = load(gateway, name="tiny", source=source)
    assert again.status_code == 200 and again.json()["created"] is False
    other = load(gateway, name="tiny", source=source, max_model_len=64)
    assert other.status_code == 409


def test_a_70b_model_is_sized_to_the_fewest_gpus_that_hold_it(gateway: ServedGateway) -> None:
    join(gateway, "gpu-a", *[H100] * 8)
    res = load(gateway, name="llama70", source=str(FIXTURES / "Llama-3.1-70B-Instruct"), max_model_len=8192)
    assert res.status_code == 200, res.text
    spec = stored(gateway, "llama70")
    # 131 GiB of bf16 weights: two 80 GB GPUs at 8k tokens (an estimate of 69 GiB on each).
    assert (spec.gpus_per_replica, spec.tensor_parallel_size) == (2, 2)
    assert 60_000 < spec.gpu_memory_mib < 78_000
    assert spec.profile is not None
    why = spec.profile.derived["spec.gpus_per_replica"]
    assert "tensor-parallel" in why, why
    # Sent again after the fleet changed, the same request is still the same load.
    join(gateway, "gpu-b", *[H100] * 8)
    again = load(gateway, name="llama70", source=str(FIXTURES / "Llama-3.1-70B-Instruct"), max_model_len=8192)
    assert again.status_code == 200 and again.json()["created"] is False


def test_a_model_no_gpu_holds_is_refused_with_the_numbers_unless_it_may_wait(gateway: ServedGateway) -> None:
    join(gateway, "small", 24_576)  # one 24 GiB GPU
    source = str(FIXTURES / "Llama-3.1-70B-Instruct")
    res = load(gateway, name="big", source=source, max_model_len=8192)
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["code"] == "insufficient_gpu_memory" and "GiB" in err["message"] and "allow_pending" in err["message"]
    assert gateway.run(gateway.store.get(keys.model_key("big"))) is None, "nothing half-written"
    waiting = load(gateway, name="big", source=source, max_model_len=8192, allow_pending=True)
    assert waiting.status_code == 200, waiting.text


def test_bad_loads_are_refused_in_one_line(gateway: ServedGateway) -> None:
    over = load(gateway, name="q", source=str(FIXTURES / "Qwen2.5-7B-Instruct"), max_model_len=1_000_000)
    assert over.status_code == 400 and "32768" in over.json()["error"]["message"], over.text
    task = load(gateway, name="e", source=str(FIXTURES / "bge-m3"), task="generate")
    assert task.status_code == 400 and task.json()["error"]["code"] == "task_mismatch", task.text
    profiled = load(gateway, name="p", source="/models/x", profile={"family": "qwen2.5"})
    assert profiled.status_code == 400 and profiled.json()["error"]["param"] == "profile"
    unknown = load(gateway, name="c", source="qwen2.5-7b-instrct")
    assert unknown.status_code == 400 and "did you mean qwen2.5-7b-instruct" in unknown.json()["error"]["message"]
    join(gateway, "two", H100, H100)
    many = load(gateway, name="m", source="/models/x", gpus_per_replica=4)
    assert many.status_code == 400 and many.json()["error"]["code"] == "insufficient_gpus", many.text
    runtime = load(gateway, name="r", source="/models/x", engine_runtime="vllm-9.9-cu99")
    assert runtime.status_code == 400 and "install-engine.sh" in runtime.json()["error"]["message"], runtime.text
    for name in ("q", "e", "p", "c", "m", "r"):
        assert gateway.run(gateway.store.get(keys.model_key(name))) is None


def test_an_embedding_model_is_detected_from_its_files(gateway: ServedGateway) -> None:
    res = load(gateway, name="bge", source=str(FIXTURES / "bge-m3"))
    assert res.status_code == 200, res.text
    spec = stored(gateway, "bge")
    assert spec.task.value == "embed" and spec.max_model_len == 2048  # [engine] default under 8192


def test_a_catalog_name_loads_its_hub_source(gateway: ServedGateway) -> None:
    res = load(gateway, name="qwen", source="qwen2.5-7b-instruct")
    assert res.status_code == 200, res.text
    assert stored(gateway, "qwen").source == "Qwen/Qwen2.5-7B-Instruct"


def test_a_quantization_the_engine_does_not_load_is_refused(gateway: ServedGateway, tmp_path: Path) -> None:
    config = json.loads((FIXTURES / "Qwen2.5-7B-Instruct" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    res = load(gateway, name="bnb", source=str(tmp_path))
    assert res.status_code == 400, res.text
    assert "bitsandbytes" in res.json()["error"]["message"] and "AWQ" in res.json()["error"]["message"]
    assert gateway.run(gateway.store.get(keys.model_key("bnb"))) is None
    awq = load(gateway, name="awq", source=str(FIXTURES / "Qwen2.5-7B-Instruct-AWQ"))
    assert awq.status_code == 200, awq.text
