"""Model families: the shipped profiles file, matching, overrides and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nebula.core.engine_args import DEFAULT_ALLOWED_ENGINE_ARGS, check_engine_request
from nebula.core.families import Families, merge, parse_profiles
from nebula.core.profile import ModelProfile
from nebula.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "nebula" / "profiles.toml"
# The parser names vLLM 0.32 registers (vllm/tool_parsers/__init__.py, vllm/reasoning/__init__.py), for the
# families shipped; a typo here would make every engine of that family fail to start.
VLLM_TOOL_PARSERS = {"hermes", "llama3_json", "llama4_pythonic", "mistral", "deepseek_v3", "deepseek_v31", "openai",
                     "glm45", "pythonic", "qwen3_coder"}
VLLM_REASONING_PARSERS = {"deepseek_r1", "qwen3", "deepseek_v3", "openai_gptoss", "glm45"}
# What the quickstart's tiny model needs (tests/integration/test_openai_api.py proves it through real engines).
TINY_ARGS = {"--tool-call-parser=pythonic", "--enable-auto-tool-choice",
             "--structured-outputs-config=" + json.dumps({"backend": "xgrammar", "disable_any_whitespace": True},
                                                         separators=(",", ":"))}


def shipped() -> Families:
    return merge([parse_profiles(SHIPPED.read_text(), str(SHIPPED))])


def test_every_shipped_entry_passes_the_engine_allow_list_and_names_real_parsers() -> None:
    fams = shipped()
    assert len(fams.rules) >= 14
    for rule in fams.rules:
        profile = ModelProfile(tool_call_parser=rule.tool_call_parser, reasoning_parser=rule.reasoning_parser,
                               engine_args=rule.engine_args)
        check_engine_request(profile.family_args(), False, DEFAULT_ALLOWED_ENGINE_ARGS, False)
        assert not rule.tool_call_parser or rule.tool_call_parser in VLLM_TOOL_PARSERS, rule.name
        assert not rule.reasoning_parser or rule.reasoning_parser in VLLM_REASONING_PARSERS, rule.name


@pytest.mark.parametrize(("model_type", "arch", "source", "family", "tool", "reasoning"), [
    ("qwen2", "Qwen2ForCausalLM", "Qwen/Qwen2.5-7B-Instruct", "qwen2.5", "hermes", ""),
    ("qwen2", "Qwen2ForCausalLM", "Qwen/QwQ-32B", "qwq", "hermes", "deepseek_r1"),
    ("qwen2", "Qwen2ForCausalLM", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-r1", "", "deepseek_r1"),
    ("qwen3", "Qwen3ForCausalLM", "Qwen/Qwen3-8B", "qwen3", "hermes", "qwen3"),
    ("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3-coder", "qwen3_coder", ""),
    ("llama", "LlamaForCausalLM", "meta-llama/Llama-3.1-8B-Instruct", "llama3", "llama3_json", ""),
    ("llama", "LlamaForCausalLM", "hf://meta-llama/Llama-3.3-70B-Instruct", "llama3", "llama3_json", ""),
    ("llama4", "Llama4ForConditionalGeneration", "meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama4",
     "llama4_pythonic", ""),
    ("mixtral", "MixtralForCausalLM", "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistral", "mistral", ""),
    ("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek-ai/DeepSeek-V3", "deepseek-v3", "deepseek_v3", ""),
    ("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek-ai/DeepSeek-V3.1", "deepseek-v3.1", "deepseek_v31",
     "deepseek_v3"),
    ("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek-ai/DeepSeek-R1", "deepseek-r1", "", "deepseek_r1"),
    ("gemma3", "Gemma3ForConditionalGeneration", "google/gemma-3-27b-it", "gemma3", "", ""),
    ("gpt_oss", "GptOssForCausalLM", "openai/gpt-oss-20b", "gpt-oss", "openai", "openai_gptoss"),
    ("glm4_moe", "Glm4MoeForCausalLM", "zai-org/GLM-4.5-Air", "glm-4.5", "glm45", "glm45"),
    ("llama", "LlamaForCausalLM", "/var/cache/nebula-dev/tiny-models/tiny-llama", "nebula-tiny", "pythonic", ""),
    ("llama", "LlamaForCausalLM", "meta-llama/Llama-2-7b-chat-hf", "", "", ""),
])
def test_shipped_families_match(model_type: str, arch: str, source: str, family: str, tool: str,
                                reasoning: str) -> None:
    rule = shipped().match(model_type, arch, source)
    got = (rule.name, rule.tool_call_parser, rule.reasoning_parser) if rule else ("", "", "")
    assert got == (family, tool, reasoning)


def test_the_tiny_model_gets_exactly_the_quickstart_chat_flags() -> None:
    rule = shipped().get("nebula-tiny")
    assert rule is not None
    profile = ModelProfile(tool_call_parser=rule.tool_call_parser, engine_args=rule.engine_args)
    assert set(profile.family_args()) == TINY_ARGS and len(profile.family_args()) == 3


def test_later_files_override_by_name_and_can_disable() -> None:
    base = parse_profiles('[[family]]\nname = "qwen2.5"\nmodel_types = ["qwen2"]\ntool_call_parser = "hermes"\n',
                          "/etc/nebula/profiles.toml")
    drop_in = parse_profiles('[[family]]\nname = "qwen2.5"\nmodel_types = ["qwen2"]\n'
                             'tool_call_parser = "qwen3_xml"\nengine_args = ["--max-num-seqs=64"]\n', "/d/10.toml")
    rule = merge([base, drop_in]).match("qwen2", "", "")
    assert rule is not None and (rule.tool_call_parser, rule.engine_args) == ("qwen3_xml", ("--max-num-seqs=64",))
    assert rule.origin == "/d/10.toml"
    off = parse_profiles('[[family]]\nname = "qwen2.5"\ndisabled = true\n', "/d/20.toml")
    assert merge([base, off]).match("qwen2", "", "") is None


def test_a_source_glob_beats_a_later_type_match() -> None:
    fams = merge([parse_profiles('[[family]]\nname = "special"\nsources = ["acme/*"]\ntool_call_parser = "hermes"\n'
                                 '[[family]]\nname = "generic"\nmodel_types = ["llama"]\n', "f")])
    assert fams.match("llama", "", "acme/model").name == "special"  # type: ignore[union-attr]
    assert fams.match("llama", "", "other/model").name == "generic"  # type: ignore[union-attr]


@pytest.mark.parametrize(("text", "key"), [
    ("[[family]\n", "not valid TOML"),
    ('[other]\nx = 1\n', "unknown table 'other'"),
    ('[[family]]\nname = "a"\nmodel_types = ["x"]\ncolour = 1\n', "family[0].colour"),
    ('[[family]]\nname = "A B"\nmodel_types = ["x"]\n', "family[0].name"),
    ('[[family]]\nname = "a"\n', "family[0] (a): set model_types"),
    ('[[family]]\nname = "a"\nmodel_types = ["x"]\ntool_call_parser = "Hermes!"\n', "family[0] (a).tool_call_parser"),
    ('[[family]]\nname = "a"\nmodel_types = "x"\n', "family[0] (a).model_types"),
    ('[[family]]\nname = "a"\nmodel_types = ["x"]\nengine_args = ["pythonic"]\n', "family[0] (a).engine_args"),
    ('[[family]]\nname = "a"\nmodel_types = ["x"]\nengine_args = ["--host=0.0.0.0"]\n', "family[0] (a).engine_args"),
    ('[[family]]\nname = "a"\nmodel_types = ["x"]\n[[family]]\nname = "a"\nmodel_types = ["y"]\n', "family[1].name"),
])
def test_errors_are_one_line_naming_file_and_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_profiles(text, "/etc/nebula/profiles.d/local.toml")
    message = str(e.value)
    assert message.startswith("/etc/nebula/profiles.d/local.toml: ") and key in message and "\n" not in message
