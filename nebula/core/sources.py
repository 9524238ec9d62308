"""Model sources: where a model's weights come from, parsed once into a typed reference.

Accepted forms: `hf://org/name` or a bare `org/name` (a Hugging Face repo id), `modelscope://org/name`,
and local directories (`/abs/path`, `./rel`, `file:///abs/path`). The revision comes from the model spec.
Each hub source has a canonical id (`hf://org/name@rev`) that names it in caches, locks, pull intents and
the node records that advertise which weights a node holds.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from nebula.errors import ValidationError

REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
HF_PREFIX = "hf://"
MODELSCOPE_PREFIX = "modelscope://"
FILE_PREFIX = "file://"


class SourceKind(enum.StrEnum):
    LOCAL = "local"
    HF = "hf"
    MODELSCOPE = "modelscope"


@dataclass(frozen=True)
class SourceRef:
    kind: SourceKind
    location: str
    """The repo id (`org/name`) of a hub source; the directory of a local one."""
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.kind is not SourceKind.LOCAL

    @property
    def id(self) -> str:
        """Canonical id: `hf://org/name`, `hf://org/name@rev`, `modelscope://org/name`, `file:///path`."""
        if self.kind is SourceKind.LOCAL:
            return FILE_PREFIX + self.location
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.kind.value}://{self.location}{rev}"


def parse_source(source: str, revision: str | None = None) -> SourceRef:
    """The reference `source` names, or ValidationError("source") saying which forms are accepted."""
    text = source.strip()
    if revision is not None and not REVISION_RE.match(revision):
        raise ValidationError("revision", "must be a branch, tag or commit (letters, digits, '.', '_', '-', '/')")
    if text.startswith(FILE_PREFIX) or text.startswith(("/", "./", "../")) or text in (".", ".."):
        path = text.removeprefix(FILE_PREFIX)
        if not path:
            raise ValidationError("source", "file:// needs a path, e.g. file:///models/llama")
        return SourceRef(SourceKind.LOCAL, path)
    for prefix, kind in ((HF_PREFIX, SourceKind.HF), (MODELSCOPE_PREFIX, SourceKind.MODELSCOPE)):
        if text.startswith(prefix):
            repo = text[len(prefix):]
            if not REPO_RE.match(repo):
                raise ValidationError("source", f"{prefix} must be followed by a repo id 'org/name', got {repo!r}")
            return SourceRef(kind, repo, revision)
    if REPO_RE.match(text):
        return SourceRef(SourceKind.HF, text, revision)
    raise ValidationError(
        "source", f"{source!r} is not a model source: give a Hugging Face repo id (org/name or hf://org/name), "
        "modelscope://org/name, or an absolute path to a model directory")


def source_id(source: str, revision: str | None = None) -> str | None:
    """The canonical id of a hub source, None for local paths and unparsable strings."""
    try:
        ref = parse_source(source, revision)
    except ValidationError:
        return None
    return ref.id if ref.is_hub else None


class SourceForm(enum.StrEnum):
    HUB = "hub"
    ABSOLUTE = "absolute"
    RELATIVE = "relative"
    """A path relative to where the command runs: the CLI makes it absolute before sending it."""


def source_form(text: str, *, exists: bool, first_part_exists: bool) -> SourceForm:
    """How the CLI reads a --source, given whether `text` is a local directory and whether its first path
    component is; ValidationError("source") with the fix when it cannot tell.

    A hub prefix is the hub; '/' or file:// an absolute path. A relative path is one that exists here, starts
    with ./ or ../, or has more than one '/': the node cannot know the CLI's working directory, so it must exist
    here (and is sent absolute). A bare org/name that is no directory here is a hub id, unless its first part
    is a local directory: then it is most likely a mistyped path, and guessing would start a download that an
    offline node retries forever.
    """
    t = text.strip()
    if t.startswith((HF_PREFIX, MODELSCOPE_PREFIX)):
        return SourceForm.HUB
    if t.startswith(("/", FILE_PREFIX)):
        return SourceForm.ABSOLUTE
    pathlike = t.startswith(("./", "../")) or t in (".", "..") or t.count("/") > 1 or t.endswith("/")
    if exists:
        return SourceForm.RELATIVE
    if pathlike:
        raise ValidationError("source", f"{text!r}: no such directory here; give the model directory's absolute "
                              "path as the node sees it (e.g. /models/x)")
    if REPO_RE.match(t) and first_part_exists:
        first = t.split("/", 1)[0]
        raise ValidationError("source", f"{text!r} is ambiguous: no such directory here, but {first}/ is one; "
                              f"write ./{t} (or an absolute path) for a local model, hf://{t} for the hub")
    return SourceForm.HUB

