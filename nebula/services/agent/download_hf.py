"""Hugging Face Hub downloads with `huggingface_hub` (blocking: the agent runs them in a thread).

The repo's commit and file sizes come first (one model_info call), so progress has a total before any byte
arrives; `snapshot_download` then fetches that exact commit into the standard hub cache layout
(`models--org--name/{blobs,snapshots}`), which resumes partial files and never fetches a blob twice.
Progress is read from the blob files on disk, independent of the library's progress bars (silenced).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from nebula.core.sources import SourceRef
from nebula.errors import PermanentError, TemporaryError
from nebula.services.agent.sources import Progress, read_token

POLL_S = 0.5


class _QuietBar(hf_tqdm):
    """The library's bars would print to the journal for every file: keep them, silent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]


class HfFetcher:
    def __init__(self, endpoint: str | None, token_file: str = "", workers: int = 8) -> None:
        self.endpoint = endpoint or None
        self.token_file = token_file
        self.workers = workers

    def fetch(self, ref: SourceRef, cache_dir: Path, progress: Progress) -> Path:
        """The local snapshot directory of `ref`; PermanentError / TemporaryError classify failures."""
        try:
            return self._fetch(ref, cache_dir, progress)
        except (PermanentError, TemporaryError):
            raise
        except Exception as e:
            raise classify(ref, e) from e

    def _fetch(self, ref: SourceRef, cache_dir: Path, progress: Progress) -> Path:
        token = read_token(self.token_file)
        api = HfApi(endpoint=self.endpoint, token=token)
        info = api.model_info(ref.location, revision=ref.revision, files_metadata=True)
        if not info.sha:
            raise PermanentError(f"{ref.id}: the hub did not name the commit of revision "
                                 f"{ref.revision or 'main'}")
        blobs = {_blob_name(s): int(s.size or 0) for s in info.siblings or []}
        total = sum(blobs.values())
        progress(0, total)
        blob_dir = cache_dir / repo_folder_name(repo_id=ref.location, repo_type="model") / "blobs"
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(blob_dir, blobs, total, progress, stop),
                                   name=f"progress {ref.id}", daemon=True)
        watcher.start()
        try:
            path = snapshot_download(ref.location, revision=info.sha, cache_dir=cache_dir, endpoint=self.endpoint,
                                     token=token, max_workers=self.workers, tqdm_class=_QuietBar)
        finally:
            stop.set()
            watcher.join()
        progress(total, total)
        return Path(path)


def _blob_name(sibling: Any) -> str:
    # The cache names a blob by its ETag: the LFS sha256 for LFS files, the git blob id otherwise.
    lfs = getattr(sibling, "lfs", None)
    return str(lfs.sha256 if lfs is not None else sibling.blob_id or sibling.rfilename)


def _watch(blob_dir: Path, blobs: dict[str, int], total: int, progress: Progress, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        progress(min(total, on_disk(blob_dir, blobs)), total)


def on_disk(blob_dir: Path, blobs: Mapping[str, int]) -> int:
    """Bytes of the expected blobs present: finished (`<etag>`) or being written (`<etag>.<id>.incomplete`)."""
    seen: dict[str, int] = {}
    try:
        entries = list(os.scandir(blob_dir))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name.split(".", 1)[0]
        if name not in blobs:
            continue
        try:
            size = entry.stat().st_size
        except OSError:
            continue
        seen[name] = max(seen.get(name, 0), min(size, blobs[name]))
    return sum(seen.values())


def classify(ref: SourceRef, e: BaseException) -> PermanentError | TemporaryError:
    """Retry intent of a download failure: what waiting cannot fix is permanent."""
    rev = ref.revision or "main"
    if isinstance(e, GatedRepoError):
        return PermanentError(f"{ref.id}: the repo is gated: accept its terms on the hub and set node.hf_token_file")
    if isinstance(e, RevisionNotFoundError):
        return PermanentError(f"{ref.id}: revision {rev!r} does not exist in the repo")
    if isinstance(e, RepositoryNotFoundError):
        return PermanentError(f"{ref.id}: no such repo on the hub (or it is private: set node.hf_token_file)")
    if isinstance(e, DisabledRepoError):
        return PermanentError(f"{ref.id}: the repo is disabled on the hub")
    if isinstance(e, RemoteEntryNotFoundError):
        return PermanentError(f"{ref.id}: a file of the repo is missing on the hub: {_first_line(e)}")
    if isinstance(e, FileMetadataError):
        return PermanentError(f"{ref.id}: the hub endpoint sends no file metadata (is node.hf_endpoint a hub "
                              f"mirror?): {_first_line(e)}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else 0
        if status in (401, 403):
            return PermanentError(f"{ref.id}: the hub refused access (HTTP {status}): check node.hf_token_file")
        if status == 429 or status >= 500 or status == 0:
            return TemporaryError(f"{ref.id}: the hub answered HTTP {status}")
        return PermanentError(f"{ref.id}: the hub answered HTTP {status}: {_first_line(e)}")
    if isinstance(e, (httpx2.TransportError, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return TemporaryError(f"{ref.id}: cannot reach the hub: {_first_line(e)}")
    if isinstance(e, OSError):
        return TemporaryError(f"{ref.id}: cannot write the download: {e}")
    return PermanentError(f"{ref.id}: download failed: {type(e).__name__}: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
