"""Reading a model's small files and safetensors headers (never its weights), from disk or a hub.

Blocking (the gateway runs it in a thread). Both readers collect the raw bytes of the files named in
`model_facts.SMALL_FILES`, the headers of the safetensors files (8-byte length, then that many bytes of
JSON: a range read on the hub), and hand them to the pure `model_facts.read_files`. Every failure is one
ValidationError("source", reason); the time and the bytes read are bounded.

The hub reader speaks the Hugging Face file API (`GET {endpoint}/{repo}/resolve/{revision}/{file}`, with
`Range` for headers; the hub answers 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound).
The profiles files (model families) are read here too.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Sequence
from pathlib import Path

import httpx2

from nebula.core import model_facts as mf
from nebula.core.families import Families, FamilyRule, merge, parse_profiles
from nebula.errors import ValidationError

DEFAULT_ENDPOINT = "https://huggingface.co"
SHIPPED_PROFILES = "/etc/nebula/profiles.toml"
MAX_HUB_SHARDS = 256
"""Above this many shards a hub model's size comes from its index alone (one range read per shard)."""


class _Budget:
    """Bytes and time left for one model's read."""

    def __init__(self, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes = self.left = max_bytes
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def take(self, n: int, what: str) -> None:
        self.left -= n
        if self.left < 0:
            raise ValidationError("source", f"reading {what} would pass the {self.max_bytes} bytes of [models] "
                                  "read_max_bytes (small files and safetensors headers together)")
        self.check(what)

    def check(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise ValidationError("source", f"reading the model's files took longer than {self.timeout_s:g} s "
                                  f"([models] read_timeout_s), at {what}")

    def remaining_s(self) -> float:
        return max(0.1, self.deadline - time.monotonic())


# --- local directories -------------------------------------------------------------------------------

def read_local(directory: str | Path, max_bytes: int = 64 << 20, timeout_s: float = 20.0) -> mf.ModelFiles:
    root = Path(directory)
    if not root.is_dir():
        raise ValidationError("source", f"{root} is not a directory on this host")
    budget = _Budget(max_bytes, timeout_s)
    raw: dict[str, bytes] = {}
    try:
        for name in mf.SMALL_FILES:
            path = root / name
            if path.is_file():
                budget.take(path.stat().st_size, name)
                raw[name] = path.read_bytes()
        present = frozenset(n for n in mf.PRESENCE_FILES if (root / n).is_file())
        headers = {name: _local_header(root / name, budget) for name in _local_shards(root, raw)}
        pickled = root / mf.PYTORCH_SINGLE
        pickled_bytes = pickled.stat().st_size if not headers and pickled.is_file() else 0
    except OSError as e:
        raise ValidationError("source", f"cannot read {root}: {e.strerror or e}") from None
    return mf.read_files(raw, present, headers, pickled_bytes)


def _local_shards(root: Path, raw: dict[str, bytes]) -> tuple[str, ...]:
    if mf.SAFETENSORS_INDEX in raw:
        names = mf.shard_names(mf.parse_json(mf.SAFETENSORS_INDEX, raw[mf.SAFETENSORS_INDEX]))
        missing = [n for n in names if not (root / n).is_file()]
        # A partial download: the index's total_size still says how large the model is.
        return () if missing else names
    if (root / mf.SAFETENSORS_SINGLE).is_file():
        return (mf.SAFETENSORS_SINGLE,)
    # Mistral's repos also carry consolidated.safetensors (the same weights in Mistral's own format).
    return tuple(sorted(p.name for p in root.glob("*.safetensors") if p.is_file()
                        and not p.name.startswith("consolidated")))


def _local_header(path: Path, budget: _Budget) -> mf.WeightSummary:
    with path.open("rb") as f:
        size = mf.header_length(path.name, f.read(8))
        budget.take(8 + size, path.name)
        data = f.read(size)
    if len(data) != size:
        raise ValidationError(path.name, "safetensors header is cut short")
    return mf.parse_header(path.name, data)


# --- hub -------------------------------------------------------------------------------------------------

def read_hub(repo: str, revision: str | None = None, endpoint: str = "", token: str | None = None,
             max_bytes: int = 64 << 20, timeout_s: float = 20.0) -> mf.ModelFiles:
    """The model files of hub repo `repo` (org/name) at `revision` (default main)."""
    base = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    rev = revision or "main"
    budget = _Budget(max_bytes, timeout_s)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx2.Client(follow_redirects=True, headers=headers, timeout=timeout_s) as client:
            hub = _Hub(client, f"{base}/{repo}/resolve/{rev}", repo, rev, budget)
            raw = {name: data for name in mf.SMALL_FILES if (data := hub.get(name)) is not None}
            if mf.CONFIG not in raw:
                raise ValidationError("source", f"{repo} has no config.json at revision {rev}: not a "
                                      "transformers model")
            present = frozenset(n for n in mf.PRESENCE_FILES if hub.exists(n))
            weights: dict[str, mf.WeightSummary] = {}
            if mf.SAFETENSORS_INDEX in raw:
                names = mf.shard_names(mf.parse_json(mf.SAFETENSORS_INDEX, raw[mf.SAFETENSORS_INDEX]))
                if len(names) <= MAX_HUB_SHARDS:
                    weights = {n: s for n in names if (s := hub.header(n)) is not None}
                    if len(weights) != len(names):
                        weights = {}
            elif (single := hub.header(mf.SAFETENSORS_SINGLE)) is not None:
                weights = {mf.SAFETENSORS_SINGLE: single}
            pickled = (0 if weights or mf.SAFETENSORS_INDEX in raw or mf.PYTORCH_INDEX in raw
                       else hub.size(mf.PYTORCH_SINGLE))
    except httpx2.TimeoutException:
        raise ValidationError("source", f"the hub at {base} did not answer within {timeout_s:g} s "
                              "([models] read_timeout_s)") from None
    except httpx2.HTTPError as e:
        raise ValidationError("source", f"cannot reach the hub at {base}: {_first_line(e)}") from None
    return mf.read_files(raw, present, weights, pickled)


class _Hub:
    def __init__(self, client: httpx2.Client, base: str, repo: str, rev: str, budget: _Budget) -> None:
        self.client, self.base, self.repo, self.rev, self.budget = client, base, repo, rev, budget

    def get(self, name: str, first: int | None = None, last: int | None = None) -> bytes | None:
        """A file's bytes (or bytes first..last), None when the repo has no such file."""
        self.budget.check(name)
        headers = {"Range": f"bytes={first}-{last}"} if first is not None else {}
        with self.client.stream("GET", f"{self.base}/{name}", headers=headers,
                                timeout=self.budget.remaining_s()) as resp:
            if resp.status_code == 404 and resp.headers.get("X-Error-Code", "EntryNotFound") == "EntryNotFound":
                return None
            self._check(resp, name)
            want = (last - first + 1) if first is not None and last is not None else None
            chunks: list[bytes] = []
            got = 0
            for chunk in resp.iter_bytes():
                if want is not None:
                    chunk = chunk[:max(0, want - got)]
                self.budget.take(len(chunk), name)
                chunks.append(chunk)
                got += len(chunk)
                if want is not None and got >= want:
                    break
            return b"".join(chunks)

    def exists(self, name: str) -> bool:
        return self.get(name, 0, 0) is not None

    def size(self, name: str) -> int:
        """A file's size from a HEAD (the hub's X-Linked-Size for large files), 0 when it has none."""
        self.budget.check(name)
        resp = self.client.head(f"{self.base}/{name}", timeout=self.budget.remaining_s())
        if resp.status_code == 404:
            return 0
        self._check(resp, name)
        value = resp.headers.get("X-Linked-Size") or resp.headers.get("Content-Length") or "0"
        return int(value) if value.isdigit() else 0

    def header(self, name: str) -> mf.WeightSummary | None:
        first8 = self.get(name, 0, 7)
        if first8 is None:
            return None
        size = mf.header_length(name, first8)
        data = self.get(name, 8, 8 + size - 1)
        if data is None or len(data) != size:
            raise ValidationError(name, "safetensors header is cut short (does the hub endpoint honour Range?)")
        return mf.parse_header(name, data)

    def _check(self, resp: httpx2.Response, name: str) -> None:
        status = resp.status_code
        if status in (200, 206):
            return
        code = resp.headers.get("X-Error-Code", "")
        if code == "RepoNotFound" or (status == 401 and not resp.request.headers.get("Authorization")):
            raise ValidationError("source", f"{self.repo}: no such repo on the hub (or it is private or gated: "
                                  "set [node] hf_token_file)")
        if code == "RevisionNotFound":
            raise ValidationError("revision", f"{self.repo} has no revision {self.rev!r}")
        if status in (401, 403):
            raise ValidationError("source", f"{self.repo}: the hub refused access (HTTP {status}): check [node] "
                                  "hf_token_file, and accept the repo's terms on the hub if it is gated")
        raise ValidationError("source", f"{self.repo}: the hub answered HTTP {status} for {name}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# --- profiles files --------------------------------------------------------------------------------------

def repo_profiles() -> Path:
    """The profiles file of a source checkout: etc/nebula/profiles.toml beside the nebula package."""
    return Path(__file__).resolve().parents[2] / "etc" / "nebula" / "profiles.toml"


def profile_paths(patterns: Sequence[str]) -> list[Path]:
    """The files `patterns` name, in order (globs in name order); the shipped file falls back to the
    repository's copy when it is not installed."""
    paths: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            paths += [Path(p) for p in sorted(glob.glob(pattern))]
        elif Path(pattern).is_file():
            paths.append(Path(pattern))
        elif pattern == SHIPPED_PROFILES and repo_profiles().is_file():
            paths.append(repo_profiles())
    return paths


def read_families(patterns: Sequence[str]) -> Families:
    """All families of the profiles files; ConfigError names the file and key of the first bad entry."""
    files: list[tuple[FamilyRule, ...]] = []
    for path in profile_paths(patterns):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValidationError("models.profiles_files", f"cannot read {path}: {e}") from None
        files.append(parse_profiles(text, str(path)))
    return merge(files)
