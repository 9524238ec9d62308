"""A model's own sequence limit, read from its published config files (tests/fixtures/model-configs), and the
engine's --max-model-len: the spec's value or the config default, never above what the model takes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from nebula.core.config import EngineConfig, parse_config
from nebula.core.engine_spec import EngineSpec, vllm_command
from nebula.core.model_limits import ModelLimit, engine_max_model_len, model_limit
from nebula.errors import ValidationError
from nebula.services.engine.supervisor import ExitCode, read_model_limit, run_engine

CONFIGS = Path(__file__).parent.parent / "fixtures" / "model-configs"
BGE_M3, RERANKER, QWEN = CONFIGS / "bge-m3", CONFIGS / "ms-marco-MiniLM-L-6-v2", CONFIGS / "Qwen2.5-7B-Instruct"


def max_len_flag(argv: list[str]) -> int | None:
    return int(argv[argv.index("--max-model-len") + 1]) if "--max-model-len" in argv else None


def test_published_configs_give_the_models_own_limits() -> None:
    assert read_model_limit(BGE_M3) == ModelLimit(8192, "max_seq_length=8192 in sentence_bert_config.json")
    assert read_model_limit(RERANKER) == ModelLimit(512, "max_position_embeddings=512 in config.json")
    assert read_model_limit(QWEN) == ModelLimit(32768, "max_position_embeddings=32768 in config.json")
    assert read_model_limit(CONFIGS / "no-such-model") is None


def test_length_keys_and_their_corrections() -> None:
    bge = json.loads((BGE_M3 / "config.json").read_text())
    # XLM-RoBERTa positions start at pad_token_id + 1: 8194 positions hold 8192 tokens, tokenizer or not.
    assert model_limit(bge).tokens == 8192  # type: ignore[union-attr]
    assert model_limit({"n_positions": 1024}) == ModelLimit(1024, "n_positions=1024 in config.json")
    assert model_limit({"seq_length": 8192, "max_seq_len": 4096}).tokens == 4096  # type: ignore[union-attr]
    assert model_limit({"text_config": {"max_position_embeddings": 4096}}).tokens == 4096  # type: ignore[union-attr]
    assert model_limit({"max_position_embeddings": 4096},
                       {"model_max_length": 2048}).tokens == 2048  # type: ignore[union-attr]
    # A tokenizer with no real limit writes VERY_LARGE_INTEGER: not a limit.
    assert model_limit({"max_position_embeddings": 4096},
                       {"model_max_length": 1000000000000000019884624838656}).tokens == 4096  # type: ignore[union-attr]
    linear = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert model_limit(linear).tokens == 8192  # type: ignore[union-attr]
    yarn = {"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert model_limit(yarn).tokens == 4096  # type: ignore[union-attr]
    assert model_limit({}) is None


def test_engine_max_model_len_is_the_smaller_of_wanted_and_possible() -> None:
    bert = ModelLimit(512, "max_position_embeddings=512 in config.json")
    assert engine_max_model_len(None, 2048, bert) == 512  # the config default no longer breaks a BERT
    assert engine_max_model_len(256, 2048, bert) == 256
    assert engine_max_model_len(None, 0, bert) == 512
    assert engine_max_model_len(None, 2048, ModelLimit(32768, "x")) == 2048
    assert engine_max_model_len(None, 0, None) is None
    assert engine_max_model_len(4096, 2048, None) == 4096
    with pytest.raises(ValidationError) as e:
        engine_max_model_len(8192, 2048, bert)
    assert str(e.value) == ("max_model_len: max_model_len 8192 is more than the model takes (512: "
                            "max_position_embeddings=512 in config.json); load it with --max-model-len 512 or less")


def test_a_bert_reranker_gets_its_own_limit_not_the_config_default() -> None:
    spec = EngineSpec(instance="rr", model="rr", source=str(RERANKER), port=18001)
    argv, _ = vllm_command(spec, EngineConfig(default_max_model_len=2048), cpu=True,
                           model_limit=read_model_limit(RERANKER))
    assert max_len_flag(argv) == 512
    argv, _ = vllm_command(spec, EngineConfig(default_max_model_len=2048), cpu=True,
                           model_limit=read_model_limit(QWEN))
    assert max_len_flag(argv) == 2048


def test_an_explicit_max_model_len_over_the_models_limit_is_a_one_line_failure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "engines").mkdir(parents=True)
    spec = EngineSpec(instance="rr", model="rr", source=str(RERANKER), port=18001, max_model_len=8192)
    (run_dir / "engines" / "rr.json").write_text(json.dumps(spec.to_dict()))
    cfg = parse_config({"node": {"run_dir": str(run_dir)}, "engine": {"hand_specs_dir": str(tmp_path / "etc")}},
                       {}, "test")
    with caplog.at_level(logging.ERROR, "nebula.engine"):
        assert run_engine("rr", cfg, {}) == ExitCode.BAD_SPEC
    assert [r.getMessage() for r in caplog.records] == [
        "cannot start engine: max_model_len 8192 is more than the model takes (512: max_position_embeddings=512 "
        "in config.json); load it with --max-model-len 512 or less"]
