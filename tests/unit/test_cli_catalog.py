"""`nebula catalog`, `nebula show` and `nebula load NAME` with a catalog name, against a real gateway app."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nebula.cli.catalog import clipped, entry_rows, query_words, variant_rows, weights_range
from nebula.cli.main import build_parser
from nebula.cli.models import load_spec
from nebula.cli.show import show_text
from nebula.core import keys
from nebula.core.config import CatalogConfig
from nebula.core.model import ModelSpec, Task
from nebula.core.profile import ModelProfile
from nebula.services.catalog_files import load_catalog
from tests.unit.served_gateway import ServedGateway, run_cli, served_gateway

PROFILE = ModelProfile(architecture="Qwen2ForCausalLM", model_type="qwen2", task="generate", max_positions=32768,
                       dtype="bfloat16", weight_bytes=15_231_233_024, layers=28, kv_heads=4, head_dim=128,
                       family="qwen2.5", tool_call_parser="hermes",
                       derived={"max_model_len": "min(requested 8192, config 2048 -> 0 (the model's own), "
                                "max_positions 32768)", "tool_call_parser": "family qwen2.5 (profiles.toml)",
                                "gpu_memory_mib": "weights 14.2 GiB + KV cache 0.9 GiB + overhead 1.5 GiB"})


def squeezed(text: str) -> str:
    """Table output with each run of blanks made one: tests name the cells, not the column widths."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServedGateway]:
    with served_gateway(catalog=load_catalog(CatalogConfig())) as gw:
        spec = ModelSpec(name="qwen", source="Qwen/Qwen2.5-7B-Instruct", max_model_len=8192, gpus_per_replica=1,
                         gpu_memory_mib=17000, profile=PROFILE)
        gw.put(keys.model_key("qwen"), spec.to_dict())
        gw.put(keys.model_key("bare"), ModelSpec(name="bare", source="/models/x", task=Task.EMBED).to_dict())
        yield gw


def test_catalog_lists_entries_and_searches(capsys: pytest.CaptureFixture[str], gateway: ServedGateway) -> None:
    code, out, _ = run_cli(capsys, gateway.url, "catalog")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "SIZES", "QUANTS", "TASK", "WEIGHTS", "GiB",
                                                         "DESCRIPTION"]
    row = "qwen2.5-instruct 0.5b,1.5b,3b,7b,14b,32b,72b bf16,awq,gptq-int4 generate 0.7-135.4 Qwen2.5 Instruct"
    assert row in squeezed(out)
    code, out, _ = run_cli(capsys, gateway.url, "catalog", "search", "qwen", "7b")
    assert code == 0 and out.splitlines()[1].startswith("qwen2.5-instruct")
    code, out, _ = run_cli(capsys, gateway.url, "catalog", "-v", "search", "bge")
    assert code == 0 and "bge-reranker-v2-m3 568m fp32 rerank 2.1 BAAI/bge-reranker-v2-m3" in squeezed(out)
    code, out, _ = run_cli(capsys, gateway.url, "catalog", "embed", "--json")
    assert code == 0 and {e["name"] for e in json.loads(out)} >= {"bge-m3", "e5-small-v2", "gte-small"}
    code, out, err = run_cli(capsys, gateway.url, "catalog", "search", "nothing-here")
    assert code == 3 and out == "" and err == ("nebula: no catalog entry matches 'nothing-here' (`nebula catalog` "
                                               "lists them all)\n")


def test_show_prints_spec_profile_with_provenance_and_replicas(capsys: pytest.CaptureFixture[str],
                                                               gateway: ServedGateway) -> None:
    code, out, _ = run_cli(capsys, gateway.url, "show", "qwen")
    assert code == 0
    lines = squeezed(out).splitlines()
    assert lines[0] == "MODEL qwen (0/1 replica(s) ready)"
    assert "max_model_len 8192 <- min(requested 8192, config 2048 -> 0 (the model's own), max_positions 32768)" \
        in lines
    assert "gpu_memory_mib 17000 <- weights 14.2 GiB + KV cache 0.9 GiB + overhead 1.5 GiB" in lines
    assert "tool_call_parser hermes <- family qwen2.5 (profiles.toml)" in lines
    assert "architecture Qwen2ForCausalLM" in lines and "REPLICAS" in lines
    code, out, _ = run_cli(capsys, gateway.url, "show", "qwen", "--json")
    assert code == 0 and json.loads(out)["spec"]["profile"]["family"] == "qwen2.5"
    code, out, _ = run_cli(capsys, gateway.url, "show", "bare")
    assert code == 0 and "not read (the model's files were not read when it was loaded)" in out


def test_show_of_a_model_not_loaded_names_what_the_catalog_would_load(capsys: pytest.CaptureFixture[str],
                                                                      gateway: ServedGateway) -> None:
    code, out, err = run_cli(capsys, gateway.url, "show", "qwen2.5-7b-instruct-awq")
    assert code == 3 and out == ""
    assert err == ("nebula: model 'qwen2.5-7b-instruct-awq' is not loaded; the catalog has it: "
                   "Qwen/Qwen2.5-7B-Instruct-AWQ (generate, 7b awq, 5.2 GiB of weights): load it with "
                   "`nebula load qwen2.5-7b-instruct-awq`\n")
    code, _, err = run_cli(capsys, gateway.url, "show", "ghost")
    assert code == 3 and err == "nebula: model 'ghost' is not loaded (`nebula list` shows the loaded ones)\n"


def _load_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["load", *argv])


def test_load_without_source_sends_the_catalog_name(tmp_path: Path) -> None:
    assert load_spec(_load_args("qwen2.5-7b-instruct"), tmp_path) == {
        "name": "qwen2.5-7b-instruct", "source": "qwen2.5-7b-instruct", "replicas": 1, "engine_args": []}
    spec = load_spec(_load_args("chat", "--source", "qwen2.5-instruct", "--size", "7b", "--quant", "awq",
                                "--max-model-len", "4096"), tmp_path)
    assert spec == {"name": "chat", "source": "qwen2.5-instruct", "size": "7b", "quant": "awq", "replicas": 1,
                    "engine_args": [], "max_model_len": 4096}
    (tmp_path / "weights").mkdir()
    spec = load_spec(_load_args("local", "--source", "weights", "--task", "embed"), tmp_path)
    assert spec["source"] == str(tmp_path / "weights") and spec["task"] == "embed"


def test_the_rows_are_pure_functions_of_the_api_json() -> None:
    entry = {"name": "x", "sizes": ["1b", "8b"], "quants": ["bf16"], "task": "generate", "description": "d",
             "variants": [{"name": "x-1b", "size": "1b", "quant": "bf16", "source": "o/x-1b", "weights_gib": 0.06},
                          {"name": "x-8b", "size": "8b", "quant": "bf16", "source": "o/x-8b", "revision": "abc",
                           "weights_gib": 15.04}]}
    assert entry_rows([entry]) == [["x", "1b,8b", "bf16", "generate", "0.06-15.0", "d"]]
    assert variant_rows([entry])[1] == ["x-8b", "8b", "bf16", "generate", "15.0", "o/x-8b@abc"]
    assert weights_range({"variants": []}) == "-"
    assert clipped("x" * 100).endswith("...") and len(clipped("x" * 100)) == 72
    assert query_words(["search", "qwen"]) == ["qwen"] and query_words(["qwen"]) == ["qwen"]
    assert show_text({"name": "gone", "spec": None, "instances": []}).splitlines()[1] == \
        "  unloading: its replicas drain, then stop"
