"""Reading the model catalog's files ([catalog] files) into a `Catalog` (nebula.core.catalog parses them)."""

from __future__ import annotations

import glob
from pathlib import Path

import nebula
from nebula.core.catalog import Catalog
from nebula.core.config import CatalogConfig
from nebula.errors import ConfigError


def shipped_catalog() -> Path:
    """The catalog in the source tree (etc/nebula/catalog.toml beside the package): what a run from a checkout
    or a test reads where /etc/nebula/catalog.toml is not installed."""
    return Path(nebula.__file__).resolve().parent.parent / "etc" / "nebula" / "catalog.toml"


def catalog_paths(cfg: CatalogConfig, shipped: Path | None = None) -> list[Path]:
    """The files [catalog] files names, in order: globs expanded in name order, a missing catalog.toml
    replaced by the shipped one (skipped where there is none: an install without /etc/nebula still starts, with
    an empty catalog); ConfigError for another missing file."""
    shipped = shipped_catalog() if shipped is None else shipped
    paths: list[Path] = []
    for pattern in cfg.files:
        if glob.has_magic(pattern):
            paths += [Path(p) for p in sorted(glob.glob(pattern))]
        elif Path(pattern).is_file():
            paths.append(Path(pattern))
        elif Path(pattern).name == "catalog.toml":
            paths += [shipped] if shipped.is_file() else []
        else:
            raise ConfigError("catalog.files", f"catalog.files: {pattern}: no such file (remove it from [catalog] "
                              "files, or create it)")
    return paths


def load_catalog(cfg: CatalogConfig, shipped: Path | None = None) -> Catalog:
    files = []
    for path in catalog_paths(cfg, shipped):
        try:
            files.append((str(path), path.read_text()))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("catalog.files", f"{path}: cannot read: {e}") from None
    return Catalog.from_texts(files)
