"""`nebula adapter add | ls | rm` against a real gateway app (in-memory store, served from its own thread)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nebula.cli.lora import source_arg
from nebula.core import keys
from nebula.core.model import ModelSpec, dumps
from nebula.core.store import Store
from tests.unit.served_gateway import run_cli, served_gateway

BASE = ModelSpec(name="pair", source="org/pair", engine_args=("--enable-lora", "--max-lora-rank=8"))


async def with_base(store: Store) -> None:
    await store.put(keys.model_key(BASE.name), dumps(BASE.to_dict()))


def adapter(tmp_path: Path, rank: int) -> Path:
    d = tmp_path / f"r{rank}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": rank}))
    return d


def test_add_list_remove(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    small = adapter(tmp_path, 4)
    with served_gateway(prepare=with_base) as gw:
        code, out, _ = run_cli(capsys, gw.url, "adapter", "ls")
        assert code == 0 and out.strip() == "no adapters"
        code, out, _ = run_cli(capsys, gw.url, "adapter", "add", "pair", "tone", "--source", str(small))
        assert code == 0 and "adapter tone added on pair" in out
        code, out, _ = run_cli(capsys, gw.url, "adapter", "ls")
        header, row = out.strip().splitlines()
        assert header.split() == ["NAME", "BASE", "RANK", "LOADED", "SOURCE", "ERROR"]
        assert row.split() == ["tone", "pair", "4", "0/0", str(small)]
        code, out, _ = run_cli(capsys, gw.url, "adapter", "ls", "--json")
        assert code == 0 and json.loads(out)[0]["loaded_on"] == []
        code, _, err = run_cli(capsys, gw.url, "unload", "pair")
        assert code == 1 and "nebula adapter rm tone" in err and len(err.strip().splitlines()) == 1, err
        code, out, _ = run_cli(capsys, gw.url, "adapter", "rm", "tone")
        assert code == 0 and "adapter tone removed" in out
        code, _, err = run_cli(capsys, gw.url, "adapter", "rm", "tone")
        assert code == 3 and "adapter 'tone' does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("argv", "code", "words"), [
    (["adapter", "add", "ghost", "x", "--source", "{small}"], 3, "base model 'ghost' is not loaded"),
    (["adapter", "add", "pair", "x", "--source", "{big}"], 2, "--max-lora-rank=16"),
    (["adapter", "add", "pair", "pair", "--source", "{small}"], 2, "cannot be named after its base"),
    (["adapter", "add", "pair", "x", "--source", "org/x", "--rank", "64"], 2, "rank 64"),
])
def test_refusals_are_one_line_naming_the_fix(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str],
                                              code: int, words: str) -> None:
    paths = {"small": str(adapter(tmp_path, 4)), "big": str(adapter(tmp_path, 16))}
    with served_gateway(prepare=with_base) as gw:
        got, out, err = run_cli(capsys, gw.url, *[a.format(**paths) for a in argv])
    assert got == code and words in err and len(err.strip().splitlines()) == 1, (got, out, err)


def test_a_local_directory_is_sent_as_an_absolute_path_and_a_hub_id_as_given(tmp_path: Path) -> None:
    (tmp_path / "lora").mkdir()
    assert source_arg("lora", tmp_path) == str(tmp_path / "lora")
    assert source_arg("org/lora", tmp_path) == "org/lora"
    assert source_arg("hf://org/lora", tmp_path) == "hf://org/lora"
