"""ModelScope downloads through its HTTP API (blocking: the agent runs them in a thread).

Not the `modelscope` package: it is 22 MB in ~2,900 files (model pipelines this agent never imports) and
brings requests, urllib3, cryptography and modelscope-hub, to do what two endpoints do:

    GET {endpoint}/api/v1/models/{org}/{name}/repo/files?Revision=R&Recursive=True   (the file list)
    GET {endpoint}/api/v1/models/{org}/{name}/repo?Revision=R&FilePath=P              (one file)

Files land in `<cache>/<org>--<name>/<revision>.partial/` and the directory is renamed to `<revision>` once
every file is complete (sizes and, where the server gives one, sha256 checked), so a half-done download is
never taken for a model; a retried download keeps the files it already finished.

Durability: a power loss may persist a rename or a file's size before its data (ext4's delayed allocation
leaves a file of the right size full of zeros). So each file is written as `<name>.part`, fsynced, renamed
into place and its directory fsynced; the tree is fsynced before the final rename; and a file found from an
earlier attempt is trusted only with the right size and, when the hub gave one, the right sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nebula.core.sources import SourceRef
from nebula.errors import PermanentError, TemporaryError
from nebula.services.agent.sources import Progress, read_token

DEFAULT_REVISION = "master"
CHUNK = 1 << 20
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None


class ModelScopeFetcher:
    def __init__(self, endpoint: str, token_file: str = "") -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token_file = token_file

    def fetch(self, ref: SourceRef, cache_dir: Path, progress: Progress) -> Path:
        revision = ref.revision or DEFAULT_REVISION
        base = cache_dir / ref.location.replace("/", "--")
        final = base / revision.replace("/", "--")
        if final.is_dir():
            return final
        files = self.list_files(ref, revision)
        total = sum(f.size for f in files)
        partial = base / f"{final.name}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        done = 0
        progress(0, total)
        for f in files:
            target = _inside(partial, f.path)
            if not _complete(target, f):
                self._download(ref, revision, f, target, _offset(progress, done, total))
            done += f.size
            progress(done, total)
        for d in {_inside(partial, f.path).parent for f in files}:
            _fsync_dir(d)
        os.replace(partial, final)
        _fsync_dir(base)
        return final

    def list_files(self, ref: SourceRef, revision: str) -> list[RemoteFile]:
        query = urllib.parse.urlencode({"Revision": revision, "Recursive": "True"})
        body = self._open(ref, f"/api/v1/models/{ref.location}/repo/files?{query}", what="the file list")
        try:
            data: Any = json.loads(body.read())
        finally:
            body.close()
        inner = data.get("Data", data) if isinstance(data, dict) else data
        entries = inner.get("Files") if isinstance(inner, dict) else inner
        if not isinstance(entries, list):
            raise PermanentError(f"{ref.id}: the ModelScope endpoint sent no file list (is node.modelscope_endpoint "
                                 "a ModelScope mirror?)")
        out = []
        for e in entries:
            if not isinstance(e, dict) or e.get("Type", "blob") == "tree":
                continue
            out.append(RemoteFile(path=str(e.get("Path") or e["Name"]), size=int(e.get("Size") or 0),
                                  sha256=e.get("Sha256") or None))
        if not out:
            raise PermanentError(f"{ref.id}: the repo has no files at revision {revision!r}")
        return out

    def _download(self, ref: SourceRef, revision: str, f: RemoteFile, target: Path, progress: Progress) -> None:
        query = urllib.parse.urlencode({"Revision": revision, "FilePath": f.path})
        resp = self._open(ref, f"/api/v1/models/{ref.location}/repo?{query}", what=f.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        n = 0
        try:
            with resp, part.open("wb") as out:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    n += len(chunk)
                    progress(n, f.size)
                out.flush()
                os.fsync(out.fileno())  # the data is on disk before the name says the file is complete
        except (OSError, urllib.error.URLError) as e:
            raise TemporaryError(f"{ref.id}: download of {f.path} broke off: {e}") from e
        if n != f.size:
            raise TemporaryError(f"{ref.id}: {f.path} arrived with {n} of {f.size} bytes")
        if f.sha256 and digest.hexdigest() != f.sha256:
            part.unlink(missing_ok=True)
            raise TemporaryError(f"{ref.id}: {f.path} arrived corrupted (sha256 mismatch)")
        os.replace(part, target)
        _fsync_dir(target.parent)

    def _open(self, ref: SourceRef, path: str, *, what: str) -> Any:
        req = urllib.request.Request(self.endpoint + path)
        token = read_token(self.token_file)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            return urllib.request.urlopen(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404:
                raise PermanentError(f"{ref.id}: no such repo, revision or file on ModelScope ({what})") from None
            if e.code in (401, 403):
                raise PermanentError(f"{ref.id}: ModelScope refused access (HTTP {e.code}): check "
                                     "node.modelscope_token_file") from None
            if e.code == 429 or e.code >= 500:
                raise TemporaryError(f"{ref.id}: ModelScope answered HTTP {e.code} for {what}") from None
            raise PermanentError(f"{ref.id}: ModelScope answered HTTP {e.code} for {what}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TemporaryError(f"{ref.id}: cannot reach ModelScope at {self.endpoint}: {reason}") from None


def _complete(target: Path, f: RemoteFile) -> bool:
    """Whether a file left by an earlier attempt can be trusted: its size, and its sha256 when known."""
    try:
        if not target.is_file() or target.stat().st_size != f.size:
            return False
        if not f.sha256:
            return True
        digest = hashlib.sha256()
        with target.open("rb") as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == f.sha256


def _fsync_dir(path: Path) -> None:
    """Make the names in `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _offset(progress: Progress, base: int, total: int) -> Progress:
    def report(n: int, _size: int) -> None:
        progress(base + n, total)

    return report


def _inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing paths that climb out of root (a hostile listing must not write elsewhere)."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise PermanentError(f"refusing file path {rel!r} outside the model directory")
    return target

