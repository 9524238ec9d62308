"""Reading model files from disk and from a hub (the local mirror harness), and the gateway's profile read."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from nebula.adapters import model_files
from nebula.core import model_facts as mf
from nebula.core.config import ModelsConfig, NodeConfig
from nebula.core.model import ModelSpec
from nebula.errors import ValidationError
from nebula.services.gateway.model_profiles import read_profile
from tests.harness import safetensors
from tests.harness.hub_mirror import running_mirror, tiny_repos
from tests.harness.ports import free_port

MODELS = Path(os.environ.get("NEBULA_TEST_MODELS", "/var/cache/nebula-dev/tiny-models"))
TINY = MODELS / "tiny-llama"
SHIPPED = model_files.read_families([model_files.SHIPPED_PROFILES])


def test_tiny_llama_is_read_from_disk_without_its_weights() -> None:
    size = (TINY / "model.safetensors").stat().st_size
    files = model_files.read_local(TINY, max_bytes=200_000)  # far less than the 5 MB of weights
    assert files.chat_template and files.generation_config is not None and files.weights is not None
    with (TINY / "model.safetensors").open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert files.weights.total_bytes == size - 8 - header
    assert files.weights.param_count == files.weights.total_bytes // 4  # float32
    p = mf.derive_profile(files, SHIPPED, str(TINY))
    assert (p.architecture, p.task, p.max_positions, p.dtype) == ("LlamaForCausalLM", "generate", 2048, "float32")
    assert (p.layers, p.hidden_size, p.kv_heads, p.head_dim) == (2, 128, 1, 64)
    assert p.family == "nebula-tiny" and "--enable-auto-tool-choice" in p.family_args()


@pytest.mark.parametrize(("name", "task"), [("tiny-bert-embed", "embed"), ("tiny-bert-rerank", "rerank")])
def test_tiny_pooling_models(name: str, task: str) -> None:
    p = mf.derive_profile(model_files.read_local(MODELS / name), SHIPPED, name)
    assert p.task == task and p.max_positions > 0 and p.weight_bytes > 0 and p.family == ""


def sharded(root: Path, data: bool = True, total: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    shards = {"model-00001-of-00002.safetensors": {"a": ("BF16", [1024, 1024])},
              "model-00002-of-00002.safetensors": {"b": ("BF16", [1024, 8]), "s": ("F32", [1])}}
    for name, tensors in shards.items():
        safetensors.write(root / name, tensors, data=data)
    index = {"metadata": {"total_size": total or (1024 * 1024 * 2 + 1024 * 8 * 2 + 4)},
             "weight_map": {t: n for n, ts in shards.items() for t in ts}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_sharded_headers_are_summed(tmp_path: Path) -> None:
    files = model_files.read_local(sharded(tmp_path / "m"))
    assert files.weights is not None
    assert (files.weights.total_bytes, dict(files.weights.params)) == (2 * 1024 * 1024 + 16384 + 4,
                                                                      {"BF16": 1024 * 1024 + 8192, "F32": 1})
    assert files.weights.source == "safetensors headers of 2 files"


def test_a_partial_download_falls_back_to_the_index(tmp_path: Path) -> None:
    root = sharded(tmp_path / "m", total=123456)
    (root / "model-00002-of-00002.safetensors").unlink()
    files = model_files.read_local(root)
    assert files.weights is not None and files.weights.total_bytes == 123456


def test_pickled_weights_count_by_size_and_consolidated_copies_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    (root / "config.json").write_text('{"architectures": ["XLMRobertaModel"]}')
    (root / "pytorch_model.bin").write_bytes(b"\0" * 4096)
    files = model_files.read_local(root)
    assert files.weights is not None and (files.weights.total_bytes, files.weights.source) == (
        4096, "size of pytorch_model.bin")
    with running_mirror({"org/old": root}) as hub:
        assert model_files.read_hub("org/old", endpoint=hub.url).weights == files.weights
    (root / "pytorch_model.bin.index.json").write_text('{"metadata": {"total_size": 8000}, "weight_map": {}}')
    assert model_files.read_local(root).weights.total_bytes == 8000  # type: ignore[union-attr]
    safetensors.write(root / "model-00001-of-00001.safetensors", {"w": ("BF16", [8])})
    safetensors.write(root / "consolidated.safetensors", {"w": ("BF16", [8])})
    assert model_files.read_local(root).weights.total_bytes == 16  # type: ignore[union-attr]


def test_huge_weights_are_never_read(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    (root / "config.json").write_text("{}")
    safetensors.write(root / "model.safetensors", {"w": ("BF16", [100_000, 100_000])})  # a 20 GB sparse file
    files = model_files.read_local(root, max_bytes=10_000)
    assert files.weights is not None and files.weights.total_bytes == 20 * 10**9


def test_local_errors_are_one_validation_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a directory"):
        model_files.read_local(tmp_path / "missing")
    with pytest.raises(ValidationError, match=r"config\.json"):
        model_files.read_local(tmp_path)
    with pytest.raises(ValidationError, match="read_max_bytes"):
        model_files.read_local(TINY, max_bytes=100)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes((1 << 50).to_bytes(8, "little"))
    with pytest.raises(ValidationError, match="header length"):
        model_files.read_local(bad)


def test_hub_reading_matches_local_reading() -> None:
    with running_mirror(tiny_repos(MODELS)) as hub:
        files = model_files.read_hub("tiny/llama", endpoint=hub.url, max_bytes=200_000)
        bodies = [p for m, p in hub.requests if m == "GET" and p.endswith("model.safetensors")]
    assert files == model_files.read_local(TINY)
    assert len(bodies) == 2  # the 8-byte length, then the header: two range reads


def test_hub_sharded_repo_reads_every_header(tmp_path: Path) -> None:
    root = sharded(tmp_path / "m", data=False)
    with running_mirror({"org/sharded": root}) as hub:
        files = model_files.read_hub("org/sharded", endpoint=hub.url)
    assert files.weights is not None and files.weights.source == "safetensors headers of 2 files"


def test_hub_token_revision_and_missing_repo() -> None:
    with running_mirror(tiny_repos(MODELS), token="s3cret") as hub:
        with pytest.raises(ValidationError, match="hf_token_file"):
            model_files.read_hub("tiny/llama", endpoint=hub.url)
        assert model_files.read_hub("tiny/llama", endpoint=hub.url, token="s3cret").config["model_type"] == "llama"
        with pytest.raises(ValidationError, match="refused access"):
            model_files.read_hub("tiny/llama", endpoint=hub.url, token="wrong")
    with running_mirror(tiny_repos(MODELS)) as hub:
        with pytest.raises(ValidationError, match="no such repo"):
            model_files.read_hub("tiny/nothing", endpoint=hub.url)
        with pytest.raises(ValidationError) as e:
            model_files.read_hub("tiny/llama", revision="v9", endpoint=hub.url)
        assert e.value.field == "revision"
        hub.fail_next = 1
        with pytest.raises(ValidationError, match="HTTP 503"):
            model_files.read_hub("tiny/llama", endpoint=hub.url)


def test_unreachable_hub_is_one_reason() -> None:
    with pytest.raises(ValidationError, match="cannot reach the hub"):
        model_files.read_hub("tiny/llama", endpoint=f"http://127.0.0.1:{free_port()}", timeout_s=2)


def test_profiles_files_fall_back_to_the_repository_and_read_drop_ins_in_order(tmp_path: Path) -> None:
    assert not Path(model_files.SHIPPED_PROFILES).exists()  # a source checkout
    assert model_files.profile_paths([model_files.SHIPPED_PROFILES]) == [model_files.repo_profiles()]
    (tmp_path / "20-b.toml").write_text('[[family]]\nname = "mine"\nsources = ["acme/*"]\n'
                                        'tool_call_parser = "pythonic"\n')
    (tmp_path / "10-a.toml").write_text('[[family]]\nname = "mine"\nsources = ["acme/*"]\n'
                                        'tool_call_parser = "hermes"\n')
    fams = model_files.read_families([model_files.SHIPPED_PROFILES, str(tmp_path / "*.toml")])
    rule = fams.match("llama", "", "acme/x")
    assert rule is not None and rule.tool_call_parser == "pythonic" and fams.get("qwen3") is not None
    assert model_files.read_families([str(tmp_path / "missing.toml")]).rules == ()


def test_gateway_reads_profiles_off_the_loop() -> None:
    models, node = ModelsConfig(), NodeConfig()
    got = asyncio.run(read_profile(ModelSpec(name="chat", source=str(TINY)), node, models))
    assert got.profile is not None and got.profile.family == "nebula-tiny" and got.reason == ""
    gone = asyncio.run(read_profile(ModelSpec(name="chat", source="/nowhere/model"), node, models))
    assert gone.profile is None and "not a directory on this gateway's host" in gone.reason
    with running_mirror(tiny_repos(MODELS)) as hub:
        hub_node = NodeConfig(hf_endpoint=hub.url)
        got = asyncio.run(read_profile(ModelSpec(name="e", source="tiny/bert-embed"), hub_node, models))
        assert got.profile is not None and got.profile.task == "embed"
        missing = asyncio.run(read_profile(ModelSpec(name="x", source="tiny/none"), hub_node, models))
        assert missing.profile is None and "no such repo" in missing.reason
    ms = asyncio.run(read_profile(ModelSpec(name="x", source="modelscope://org/m"), node, models))
    assert ms.profile is None and "modelscope" in ms.reason
