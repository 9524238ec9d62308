"""The admin API's model profile: read a model's files when it is loaded, before anything is stored.

The reading blocks (disk, hub), so it runs in a thread. Local sources are read only when the directory
exists on this host (the gateway may not share the nodes' disks); hub sources through [node] hf_endpoint
and hf_token_file, as the nodes download them. When the files cannot be read the load goes on unprofiled,
with the reason kept for the log. A broken profiles file is not such a case: it is the operator's error
and is raised (ValidationError naming the file and key).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from nebula.adapters.model_files import read_families, read_hub, read_local
from nebula.core.config import ModelsConfig, NodeConfig
from nebula.core.families import Families
from nebula.core.model import ModelSpec
from nebula.core.model_facts import ModelFiles, derive_profile
from nebula.core.profile import ModelProfile
from nebula.core.sources import SourceKind, parse_source
from nebula.errors import ValidationError


@dataclass(frozen=True)
class ProfileRead:
    profile: ModelProfile | None
    reason: str = ""
    """Why there is no profile (None), for the log and the load's answer."""


async def read_profile(spec: ModelSpec, node: NodeConfig, models: ModelsConfig,
                       families: Families | None = None) -> ProfileRead:
    """The profile of `spec`'s model, or None with the reason it could not be read."""
    return await asyncio.to_thread(read_profile_blocking, spec, node, models, families)


def read_profile_blocking(spec: ModelSpec, node: NodeConfig, models: ModelsConfig,
                          families: Families | None = None) -> ProfileRead:
    ref = parse_source(spec.source, spec.revision)
    fams = families if families is not None else read_families(models.profiles_files)
    try:
        files = _read(ref.kind, ref.location, ref.revision, node, models)
    except ValidationError as e:
        return ProfileRead(None, f"the model's files could not be read: {e}")
    if files is None:
        return ProfileRead(None, f"{ref.location} is not a directory on this gateway's host: the files are read "
                           "where they are, so the load goes on without a profile")
    try:
        return ProfileRead(derive_profile(files, fams, ref.location))
    except ValidationError as e:
        return ProfileRead(None, f"the model's files could not be read: {e}")


def _read(kind: SourceKind, location: str, revision: str | None, node: NodeConfig,
          models: ModelsConfig) -> ModelFiles | None:
    if kind is SourceKind.LOCAL:
        if not Path(location).is_dir():
            return None
        return read_local(location, models.read_max_bytes, models.read_timeout_s)
    if kind is SourceKind.HF:
        return read_hub(location, revision, node.hf_endpoint, _token(node.hf_token_file), models.read_max_bytes,
                        models.read_timeout_s)
    raise ValidationError("source", f"profiles are read from Hugging Face and local sources; {kind.value} is not "
                          "read yet")


def _token(path: str) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError("source", f"cannot read [node] hf_token_file {path}: {e}") from None
