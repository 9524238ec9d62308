"""The model catalog (core/catalog.py): parsing with one-line errors naming file and key, resolution of names,
sizes and quants, suggestions for unknown names, search ranking, and load requests made plain specs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core.catalog import Catalog, is_catalog_name, parse_catalog, resolve_spec
from nebula.core.model import ModelSpec, Task
from nebula.errors import ConfigError, ValidationError
from nebula.services.catalog_files import shipped_catalog

SMALL = """
[models."qwen2.5-instruct"]
names = "qwen2.5-{size}-instruct"
description = "Qwen2.5 chat"
variants = [
    { size = "7b", quant = "bf16", source = "Qwen/Qwen2.5-7B-Instruct", weights_gib = 14.2 },
    { size = "7b", quant = "awq", source = "Qwen/Qwen2.5-7B-Instruct-AWQ", revision = "main", weights_gib = 5.2 },
    { size = "72b", quant = "bf16", source = "Qwen/Qwen2.5-72B-Instruct", max_model_len = 8192 },
]

[models."bge-m3"]
task = "embed"
names = "bge-m3"
max_model_len = 8192
variants = [{ size = "568m", quant = "fp32", source = "BAAI/bge-m3" }]
"""


@pytest.fixture(scope="module")
def small() -> Catalog:
    return Catalog.from_texts([("base.toml", SMALL)])


@pytest.fixture(scope="module")
def shipped() -> Catalog:
    return Catalog.from_texts([(str(shipped_catalog()), shipped_catalog().read_text())])


def test_a_variant_resolves_by_its_own_name_or_by_entry_size_and_quant(small: Catalog) -> None:
    m = small.resolve("qwen2.5-7b-instruct")
    assert (m.source, m.quant, m.size, m.task, m.revision) == ("Qwen/Qwen2.5-7B-Instruct", "bf16", "7b",
                                                               Task.GENERATE, None)
    assert small.resolve("qwen2.5-instruct", "7b", "awq") == small.resolve("qwen2.5-7b-instruct-awq")
    assert small.resolve("qwen2.5-7b-instruct", quant="awq").name == "qwen2.5-7b-instruct-awq"
    assert small.resolve("qwen2.5-instruct", "72b").max_model_len == 8192
    # One size: no --size needed; the entry's max_model_len when the variant has none.
    bge = small.resolve("bge-m3")
    assert (bge.task, bge.max_model_len, bge.source) == (Task.EMBED, 8192, "BAAI/bge-m3")


@pytest.mark.parametrize(("name", "size", "quant", "field", "words"), [
    ("qwen2.5-7b-instrct", None, None, "source", "did you mean qwen2.5-7b-instruct"),
    ("qwen2.5-7b-instrct", None, None, "source", "(nebula catalog search qwen)"),
    ("nothing-like-it", None, None, "source", "no catalog entry 'nothing-like-it' (list them with `nebula catalog`)"),
    ("qwen2.5-instruct", None, None, "size", "comes in sizes 7b, 72b"),
    ("qwen2.5-instruct", "3b", None, "size", "has no size '3b'; it comes in 7b, 72b"),
    ("qwen2.5-instruct", "72b", "awq", "quant", "72b comes as bf16, not 'awq'"),
    ("qwen2.5-instruct", "7b", "gguf", "quant", "GGUF is not served"),
    ("qwen2.5-7b-instruct", "72b", None, "size", "is the 7b size of qwen2.5-instruct"),
])
def test_what_cannot_resolve_says_why_and_what_would(small: Catalog, name: str, size: str | None,
                                                     quant: str | None, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as e:
        small.resolve(name, size, quant)
    assert e.value.field == field and words in e.value.message


def test_the_shipped_catalog_suggests_the_closest_names(shipped: Catalog) -> None:
    with pytest.raises(ValidationError, match=r"no catalog entry 'qwen2\.5-7b-instrct'; did you mean "
                       r"qwen2\.5-7b-instruct\b.*\(nebula catalog search qwen\)"):
        shipped.resolve("qwen2.5-7b-instrct")
    assert shipped.suggestions("llama-8b")[0] == "llama3.1-8b-instruct"


def test_search_ranks_name_matches_first_and_needs_every_word(shipped: Catalog) -> None:
    assert shipped.search("qwen 7b")[0].name == "qwen2.5-instruct"
    assert [e.name for e in shipped.search("qwen3")] == ["qwen3"]
    assert {e.name for e in shipped.search("embed")} >= {"bge-m3", "e5-small-v2", "gte-small"}
    assert [e.name for e in shipped.search("rerank")] == ["bge-reranker-v2-m3"]
    assert [e.name for e in shipped.search(["awq", "70b"])] == ["llama3.1-instruct"]
    assert shipped.search("qwen nonsense-word") == []
    assert len(shipped.search("")) == len(shipped.entries)


def test_the_shipped_catalog_has_what_the_issue_names(shipped: Catalog) -> None:
    for name, source in [("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct"),
                         ("qwen2.5-72b-instruct-awq", "Qwen/Qwen2.5-72B-Instruct-AWQ"),
                         ("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B"), ("qwen3-0.6b", "Qwen/Qwen3-0.6B"),
                         ("llama3.1-70b-instruct", "meta-llama/Llama-3.1-70B-Instruct"),
                         ("llama3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct"),
                         ("llama3.3-70b-instruct", "meta-llama/Llama-3.3-70B-Instruct"),
                         ("mistral-7b-instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
                         ("mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
                         ("deepseek-r1-distill-qwen-32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
                         ("gemma3-27b-it", "google/gemma-3-27b-it"), ("gpt-oss-120b", "openai/gpt-oss-120b"),
                         ("glm4.5-air", "zai-org/GLM-4.5-Air"), ("bge-m3", "BAAI/bge-m3"),
                         ("bge-reranker-v2-m3", "BAAI/bge-reranker-v2-m3"), ("e5-small-v2", "intfloat/e5-small-v2"),
                         ("gte-small", "thenlper/gte-small")]:
        assert shipped.resolve(name).source == source, name
    assert shipped.resolve("bge-reranker-v2-m3").task is Task.RERANK
    assert all(v.weights_gib > 0 for e in shipped.entries.values() for v in e.variants)
    sizes = shipped.entries["qwen2.5-instruct"].sizes
    assert sizes == ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")
    assert all(shipped.resolve("qwen2.5-instruct", s, "awq").source.endswith("-AWQ") for s in sizes)


def test_a_later_file_replaces_an_entry_of_the_same_name() -> None:
    mine = '[models."bge-m3"]\ntask = "embed"\nvariants = [{ size = "568m", quant = "fp16", source = "me/bge-m3" }]\n'
    cat = Catalog.from_texts([("base.toml", SMALL), ("catalog.d/10-mine.toml", mine)])
    assert cat.resolve("bge-m3-568m").source == "me/bge-m3"  # no `names`: <name>-<size>
    assert cat.resolve("qwen2.5-7b-instruct").source == "Qwen/Qwen2.5-7B-Instruct"
    assert cat.entries["bge-m3"].origin == "catalog.d/10-mine.toml"


@pytest.mark.parametrize(("text", "message"), [
    ("[models.x\n", "f.toml: not valid TOML"),
    ("[other]\n", "f.toml: other: unknown table"),
    ('[models.x]\nvariants = []\n', "f.toml: models.x.variants: must list at least one variant"),
    ('[models.x]\ntask = "chat"\nvariants = [{size="1b", quant="bf16", source="a/b"}]\n',
     "f.toml: models.x.task: must be one of generate, embed, rerank"),
    ('[models.x]\ncolour = 1\nvariants = [{size="1b", quant="bf16", source="a/b"}]\n',
     "f.toml: models.x.colour: unknown key"),
    ('[models.x]\nvariants = [{size="1b", quant="gguf", source="a/b"}]\n',
     "f.toml: models.x.variants[0].quant: GGUF is not served"),
    ('[models.x]\nvariants = [{size="1b", quant="int3", source="a/b"}]\n',
     "f.toml: models.x.variants[0].quant: must be one of bf16"),
    ('[models.x]\nvariants = [{size="1b", quant="bf16", source="not a repo"}]\n',
     "f.toml: models.x.variants[0].source: 'not a repo' is not a model source"),
    ('[models.x]\nvariants = [{size="1b", quant="bf16"}]\n', "f.toml: models.x.variants[0].source: is required"),
    ('[models.x]\nvariants = [{size="big", quant="bf16", source="a/b"}]\n', "models.x.variants[0].size: 'big'"),
    ('[models.x]\nvariants = [{size="1b", quant="bf16", source="a/b", weights_gib="3"}]\n',
     "models.x.variants[0].weights_gib: must be a int or float"),
    ('[models.x]\nvariants = [{size="1b", quant="bf16", source="a/b"}, {size="1b", quant="bf16", source="a/c"}]\n',
     "models.x.variants[1]: size 1b quant bf16 is listed twice"),
    ('[models.x]\nnames = "x"\nvariants = [{size="1b", quant="bf16", source="a/b"}, '
     '{size="2b", quant="bf16", source="a/c"}]\n', "models.x.names: must contain {size}"),
    ('[models.X]\nvariants = [{size="1b", quant="bf16", source="a/b"}]\n', "f.toml: models: 'X' is not a model name"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_catalog(text, "f.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_two_entries_may_not_give_one_name() -> None:
    a = '[models.a]\nnames = "same-{size}"\nvariants = [{size="1b", quant="bf16", source="a/b"}]\n'
    b = '[models.b]\nnames = "same-{size}"\nvariants = [{size="1b", quant="bf16", source="a/c"}]\n'
    with pytest.raises(ConfigError, match=r"b.toml: models.b: the name 'same-1b' is also given by models.a "
                       r"\(a.toml\)"):
        Catalog.from_texts([("a.toml", a), ("b.toml", b)])


def test_a_catalog_name_is_what_no_other_source_form_is() -> None:
    assert is_catalog_name("qwen2.5-7b-instruct")
    for source in ("Qwen/Qwen2.5-7B-Instruct", "hf://a/b", "/models/x", "./x", "file:///x", "Big"):
        assert not is_catalog_name(source)


def test_a_load_request_naming_the_catalog_becomes_a_plain_spec(small: Catalog) -> None:
    spec = resolve_spec({"source": "qwen2.5-instruct", "size": "7b", "quant": "awq", "replicas": 2}, small)
    assert spec == {"name": "qwen2.5-instruct", "source": "Qwen/Qwen2.5-7B-Instruct-AWQ", "revision": "main",
                    "task": "generate", "replicas": 2}
    parsed = ModelSpec.from_dict(spec)
    assert parsed.source_id == "hf://Qwen/Qwen2.5-7B-Instruct-AWQ@main"
    # The request's own name, revision and max_model_len win over the catalog's.
    spec = resolve_spec({"name": "emb", "source": "bge-m3", "max_model_len": 512, "revision": "abc"}, small)
    assert (spec["name"], spec["task"], spec["max_model_len"], spec["revision"]) == ("emb", "embed", 512, "abc")
    assert resolve_spec({"name": "e", "source": "bge-m3"}, small)["max_model_len"] == 8192
    # Sources that are not catalog names pass unchanged.
    plain = {"name": "m", "source": "Qwen/Qwen2.5-7B-Instruct", "task": "embed"}
    assert resolve_spec(plain, small) == plain


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({"name": "e", "source": "bge-m3", "task": "generate"}, "task",
     "catalog entry bge-m3 serves task embed, but the spec says task 'generate'"),
    ({"name": "m", "source": "/models/x", "size": "7b"}, "size", "the source is not a catalog name"),
    ({"name": "m", "source": "a/b", "quant": "awq"}, "quant", "the source is not a catalog name"),
    ({"name": "m", "source": "qwen2.5-instruct", "size": 7}, "size", "must be a non-empty string"),
    ({"name": "m", "source": "qwen2.5-7b-instrct"}, "source", "did you mean qwen2.5-7b-instruct"),
])
def test_a_load_request_the_catalog_contradicts_is_refused(small: Catalog, spec: dict[str, object], field: str,
                                                          words: str) -> None:
    with pytest.raises(ValidationError) as e:
        resolve_spec(spec, small)
    assert e.value.field == field and words in e.value.message


@given(st.text(max_size=40), st.one_of(st.none(), st.text(max_size=8)), st.one_of(st.none(), st.text(max_size=8)))
def test_any_name_resolves_or_is_refused_with_a_validation_error(name: str, size: str | None,
                                                                 quant: str | None) -> None:
    cat = Catalog.from_texts([("base.toml", SMALL)])
    try:
        m = cat.resolve(name, size, quant)
    except ValidationError as e:
        assert e.field in ("source", "size", "quant") and e.message
    else:
        assert m.name in cat.variants
