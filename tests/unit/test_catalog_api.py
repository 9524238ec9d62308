"""The catalog as the gateway serves it (/v1/admin/catalog), and as [catalog] files are read into it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from nebula.core.catalog import Catalog
from nebula.core.config import CatalogConfig, parse_config
from nebula.core.model import ModelSpec
from nebula.errors import ConfigError, ValidationError
from nebula.services.catalog_files import catalog_paths, load_catalog, shipped_catalog
from nebula.services.gateway.catalog_api import resolve_catalog, resolve_catalog_model
from tests.unit.served_gateway import ADMIN_KEY, ServedGateway, served_gateway

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServedGateway]:
    with served_gateway(catalog=load_catalog(CatalogConfig())) as gw:
        yield gw


def get(gateway: ServedGateway, path: str, key: str | None = ADMIN_KEY) -> requests.Response:
    return requests.get(gateway.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5)


def test_the_catalog_lists_and_searches(gateway: ServedGateway) -> None:
    res = get(gateway, "/v1/admin/catalog")
    assert res.status_code == 200 and res.json()["object"] == "list"
    names = [e["name"] for e in res.json()["data"]]
    assert {"qwen2.5-instruct", "bge-m3", "gpt-oss"} <= set(names)
    found = get(gateway, "/v1/admin/catalog?q=qwen+7b").json()["data"]
    assert found[0]["name"] == "qwen2.5-instruct" and "7b" in found[0]["sizes"]
    variant = next(v for v in found[0]["variants"] if v["name"] == "qwen2.5-7b-instruct-awq")
    assert (variant["source"], variant["quant"], variant["size"]) == ("Qwen/Qwen2.5-7B-Instruct-AWQ", "awq", "7b")
    assert get(gateway, "/v1/admin/catalog?q=no-such-thing").json()["data"] == []
    long = get(gateway, "/v1/admin/catalog?q=" + "x" * 201)
    assert long.status_code == 400 and long.json()["error"]["param"] == "q"


def test_one_variant_by_name_or_by_entry_size_and_quant(gateway: ServedGateway) -> None:
    one = get(gateway, "/v1/admin/catalog/qwen2.5-instruct?size=7b&quant=awq").json()
    assert one["model"]["name"] == "qwen2.5-7b-instruct-awq" and one["entry"]["name"] == "qwen2.5-instruct"
    assert get(gateway, "/v1/admin/catalog/bge-m3").json()["model"]["task"] == "embed"
    missing = get(gateway, "/v1/admin/catalog/qwen2.5-7b-instrct")
    assert missing.status_code == 404 and "did you mean qwen2.5-7b-instruct" in missing.json()["error"]["message"]
    no_size = get(gateway, "/v1/admin/catalog/qwen2.5-instruct")
    assert no_size.status_code == 400 and no_size.json()["error"]["param"] == "size"


def test_the_catalog_is_admin_only(gateway: ServedGateway) -> None:
    assert get(gateway, "/v1/admin/catalog", key=None).status_code == 401


def test_resolve_catalog_makes_the_load_body_a_spec() -> None:
    catalog = load_catalog(CatalogConfig())
    body = resolve_catalog({"source": "qwen2.5-7b-instruct", "replicas": 2}, catalog)
    spec = ModelSpec.from_dict(body)
    assert (spec.name, spec.source, spec.replicas) == ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", 2)
    assert resolve_catalog([1, 2], catalog) == [1, 2]  # not an object: ModelSpec.from_dict says so
    body, model = resolve_catalog_model({"source": "qwen2.5-instruct", "size": "7b", "quant": "awq"}, catalog)
    assert model is not None and model.provenance == (
        f"catalog qwen2.5-7b-instruct-awq (qwen2.5-instruct 7b awq, {shipped_catalog()})")
    assert resolve_catalog_model({"name": "m", "source": "a/b"}, catalog) == ({"name": "m", "source": "a/b"}, None)
    with pytest.raises(ValidationError, match="serves task embed"):
        resolve_catalog({"name": "x", "source": "bge-m3", "task": "rerank"}, catalog)


def test_files_are_read_in_order_and_a_missing_catalog_toml_reads_the_shipped_one(tmp_path: Path) -> None:
    (tmp_path / "catalog.d").mkdir()
    (tmp_path / "catalog.d" / "20-b.toml").write_text(
        '[models."bge-m3"]\ntask = "embed"\nvariants = [{ size = "568m", quant = "fp16", source = "me/b" }]\n')
    (tmp_path / "catalog.d" / "10-a.toml").write_text(
        '[models."bge-m3"]\ntask = "embed"\nvariants = [{ size = "568m", quant = "fp16", source = "me/a" }]\n')
    cfg = CatalogConfig(files=(str(tmp_path / "catalog.toml"), str(tmp_path / "catalog.d" / "*.toml")))
    assert catalog_paths(cfg) == [shipped_catalog(), tmp_path / "catalog.d/10-a.toml", tmp_path / "catalog.d/20-b.toml"]
    catalog = load_catalog(cfg)
    assert catalog.resolve("bge-m3-568m").source == "me/b" and "qwen3" in catalog.entries
    assert load_catalog(cfg, shipped=tmp_path / "none.toml").entries.keys() == {"bge-m3"}


def test_a_bad_or_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.x]\nvariants = [{ size = "1b", quant = "gguf", source = "a/b" }]\n')
    with pytest.raises(ConfigError, match=rf"^{bad}: models.x.variants\[0\].quant: GGUF is not served"):
        load_catalog(CatalogConfig(files=(str(bad),)))
    with pytest.raises(ConfigError, match=r"catalog.files: /nonexistent/mine.toml: no such file"):
        load_catalog(CatalogConfig(files=("/nonexistent/mine.toml",)))
    assert load_catalog(CatalogConfig(files=(str(tmp_path / "none" / "*.toml"),))).entries == {}


def test_the_catalog_section_parses_from_toml_and_the_environment() -> None:
    cfg = parse_config({"catalog": {"files": ["/srv/catalog.toml"]}}, {}, "t")
    assert cfg.catalog.files == ("/srv/catalog.toml",)
    cfg = parse_config({}, {"NEBULA_CATALOG_FILES": "/a.toml,/b/*.toml"}, "t")
    assert cfg.catalog.files == ("/a.toml", "/b/*.toml")
    assert isinstance(Catalog(), Catalog) and Catalog().search("x") == []
