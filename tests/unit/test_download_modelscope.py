"""ModelScope downloads after a power loss: nothing is trusted that a crash could have left incomplete.

The hub is faked at the fetcher's HTTP seam (`_open`); the real endpoints are covered against a local mirror in
tests/integration/test_downloads.py.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest

from nebula.core.sources import parse_source
from nebula.services.agent.download_modelscope import ModelScopeFetcher, RemoteFile

WEIGHTS = b"weights" * 1000
CONFIG = b'{"max_position_embeddings": 512}'


class FakeHub(ModelScopeFetcher):
    def __init__(self, files: dict[str, bytes], *, hashes: bool = True) -> None:
        super().__init__("http://modelscope.invalid")
        self.files = files
        self.hashes = hashes
        self.fetched: list[str] = []

    def list_files(self, ref: Any, revision: str) -> list[RemoteFile]:
        return [RemoteFile(p, len(b), hashlib.sha256(b).hexdigest() if self.hashes else None)
                for p, b in self.files.items()]

    def _open(self, ref: Any, path: str, *, what: str) -> Any:
        self.fetched.append(what)
        return io.BytesIO(self.files[what])


REF = parse_source("modelscope://org/m")


def test_a_file_of_the_right_size_but_wrong_bytes_is_fetched_again(tmp_path: Path) -> None:
    """What a power loss leaves on ext4: the size made it to disk, the data did not (zeros)."""
    partial = tmp_path / "org--m" / "master.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * len(WEIGHTS))
    (partial / "config.json").write_bytes(CONFIG)
    hub = FakeHub({"model.safetensors": WEIGHTS, "config.json": CONFIG})
    final = hub.fetch(REF, tmp_path, lambda _n, _t: None)
    assert (final / "model.safetensors").read_bytes() == WEIGHTS
    assert hub.fetched == ["model.safetensors"], "the intact file is kept"


def test_without_a_hash_the_size_decides_and_an_unfinished_part_is_never_trusted(tmp_path: Path) -> None:
    partial = tmp_path / "org--m" / "master.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors.part").write_bytes(WEIGHTS)  # written, never confirmed by its rename
    (partial / "config.json").write_bytes(CONFIG[:-1])
    hub = FakeHub({"model.safetensors": WEIGHTS, "config.json": CONFIG}, hashes=False)
    final = hub.fetch(REF, tmp_path, lambda _n, _t: None)
    assert sorted(hub.fetched) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]


def test_data_is_synced_before_each_rename_and_the_names_after(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = FakeHub({"sub/config.json": CONFIG}).fetch(REF, tmp_path, lambda _n, _t: None)
    partial = tmp_path / "org--m" / "master.partial"
    assert events == [
        ("fsync", str(partial / "sub" / "config.json.part")),  # the data, before its name
        ("rename", str(partial / "sub" / "config.json")),
        ("fsync", str(partial / "sub")),                       # the file's name
        ("fsync", str(partial / "sub")),                       # the tree, before the model's name
        ("rename", str(final)),
        ("fsync", str(tmp_path / "org--m")),                   # the model's name
    ]
