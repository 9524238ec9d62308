"""The model catalog: names people load by (`qwen2.5-7b-instruct`, `qwen2.5-instruct --size 7b --quant awq`),
each resolved to a hub repo, revision, task and context length.

Pure: the caller reads the TOML files (services/catalog_files.py) and passes their text in order; an entry of
a later file replaces an earlier one of the same name, so operators override the shipped catalog from
catalog.d/. Each entry has sizes and, per size, quantized variants; the first variant listed for a size is
its default and is named by the entry's `names` template (`qwen2.5-{size}-instruct`), the others add their
quant (`qwen2.5-7b-instruct-awq`).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nebula.core.model import NAME_RE, Task
from nebula.core.sources import parse_source
from nebula.errors import ConfigError, ValidationError

QUANTS = ("bf16", "fp16", "fp32", "fp8", "awq", "gptq-int4", "gptq-int8", "mxfp4")
"""Weight formats vLLM serves from safetensors; the quant a variant is listed under."""
UNSUPPORTED_QUANTS = {
    "gguf": "GGUF is not served: vLLM's GGUF loader is experimental and single-file; choose a safetensors "
            "variant (awq, gptq-int4 or fp8)",
}
SIZE_RE = re.compile(r"^[0-9][0-9a-z.]*(-[0-9a-z.]+)?$")
_ENTRY_KEYS = frozenset({"task", "description", "names", "max_model_len", "variants"})
_VARIANT_KEYS = frozenset({"size", "quant", "source", "revision", "weights_gib", "max_model_len", "note"})


@dataclass(frozen=True)
class CatalogVariant:
    size: str
    quant: str
    source: str
    revision: str | None = None
    weights_gib: float = 0.0
    """Size of the published weights, for people choosing a variant; memory estimates read the model's files."""
    max_model_len: int | None = None
    note: str = ""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    task: Task
    variants: tuple[CatalogVariant, ...]
    names: str = ""
    """Template of the variants' names, `{size}` replaced; empty: `<name>-<size>`."""
    description: str = ""
    max_model_len: int | None = None
    origin: str = ""
    """The file it came from, for messages."""

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v.size for v in self.variants))

    @property
    def quants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v.quant for v in self.variants))

    def variant_name(self, variant: CatalogVariant) -> str:
        base = self.names.replace("{size}", variant.size) if self.names else f"{self.name}-{variant.size}"
        default = next(v for v in self.variants if v.size == variant.size)
        return base if variant == default else f"{base}-{variant.quant}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "task": self.task.value, "description": self.description,
                "max_model_len": self.max_model_len, "sizes": list(self.sizes), "quants": list(self.quants),
                "variants": [{"name": self.variant_name(v), "size": v.size, "quant": v.quant, "source": v.source,
                              "revision": v.revision, "weights_gib": v.weights_gib,
                              "max_model_len": v.max_model_len or self.max_model_len, "note": v.note}
                             for v in self.variants]}


@dataclass(frozen=True)
class CatalogModel:
    """One variant, resolved: what a model spec takes from the catalog."""

    name: str
    entry: str
    size: str
    quant: str
    source: str
    revision: str | None
    task: Task
    max_model_len: int | None
    weights_gib: float
    note: str
    origin: str = ""

    @property
    def provenance(self) -> str:
        """For a profile's `derived` map: where the spec's source, task and context came from."""
        return f"catalog {self.name} ({self.entry} {self.size} {self.quant}, {self.origin or 'catalog'})"


class Catalog:
    """Entries by name (later files replace earlier ones) and every variant by its full name."""

    def __init__(self, entries: Iterable[CatalogEntry] = ()) -> None:
        self.entries: dict[str, CatalogEntry] = {}
        for e in entries:
            self.entries[e.name] = e
        self.variants: dict[str, tuple[CatalogEntry, CatalogVariant]] = {}
        for e in self.entries.values():
            for v in e.variants:
                full = e.variant_name(v)
                if full in self.variants or (full in self.entries and full != e.name):
                    other = self.variants[full][0] if full in self.variants else self.entries[full]
                    raise ConfigError("catalog", f"{e.origin}: models.{e.name}: the name {full!r} is also "
                                      f"given by models.{other.name} ({other.origin}); rename one")
                validate_catalog_name(full, f"{e.origin}: models.{e.name}.names")
                self.variants[full] = (e, v)

    @staticmethod
    def from_texts(files: Sequence[tuple[str, str]]) -> Catalog:
        """The catalog of (origin, TOML text) pairs, in order; ConfigError naming the file and key at fault."""
        entries: dict[str, CatalogEntry] = {}
        for origin, text in files:
            entries.update(parse_catalog(text, origin))
        return Catalog(entries.values())

    def resolve(self, name: str, size: str | None = None, quant: str | None = None) -> CatalogModel:
        """The variant `name` (a variant's or an entry's name) with `size` and `quant` picks; ValidationError
        with the closest names when there is none."""
        if quant in UNSUPPORTED_QUANTS:
            raise ValidationError("quant", UNSUPPORTED_QUANTS[quant])
        if name in self.variants:
            entry, variant = self.variants[name]
            if size is not None and size != variant.size:
                raise ValidationError("size", f"{name} is the {variant.size} size of {entry.name}; drop --size, "
                                      f"or load {entry.name} --size {size}")
            if quant is None or quant == variant.quant:
                return _resolved(entry, variant)
            return self.resolve(entry.name, variant.size, quant)
        entry_or_none = self.entries.get(name)
        if entry_or_none is None:
            raise ValidationError("source", self.unknown_message(name))
        entry = entry_or_none
        sizes = entry.sizes
        if size is None:
            if len(sizes) > 1:
                raise ValidationError("size", f"{name} comes in sizes {', '.join(sizes)}: choose one (--size "
                                      f"{sizes[0]}, or load {entry.variant_name(entry.variants[0])})")
            size = sizes[0]
        if size not in sizes:
            raise ValidationError("size", f"{name} has no size {size!r}; it comes in {', '.join(sizes)}")
        candidates = [v for v in entry.variants if v.size == size]
        if quant is None:
            return _resolved(entry, candidates[0])
        for v in candidates:
            if v.quant == quant:
                return _resolved(entry, v)
        raise ValidationError("quant", f"{name} {size} comes as {', '.join(v.quant for v in candidates)}, not "
                              f"{quant!r} (add your own variant in /etc/nebula/catalog.d/)")

    def suggestions(self, name: str, n: int = 3) -> list[str]:
        # 0.5: `llama-8b` still finds llama3.1-8b-instruct; unrelated names stay out.
        return difflib.get_close_matches(name, [*self.variants, *self.entries], n=n, cutoff=0.5)

    def unknown_message(self, name: str) -> str:
        close = self.suggestions(name)
        word = m.group(0) if (m := re.match(r"[a-z]+", name)) else name
        if close:
            return (f"no catalog entry {name!r}; did you mean {' or '.join(close)}? "
                    f"(nebula catalog search {word})")
        return (f"no catalog entry {name!r} (list them with `nebula catalog`), and not a model source: give a hub "
                "repo id (org/name, hf://org/name), modelscope://org/name or a model directory's absolute path")

    def search(self, words: str | Sequence[str] = ()) -> list[CatalogEntry]:
        """Entries matching every word, best first: a word equal to a part of the name counts most, then one
        inside the name, then one in the sizes, quants, sources, task or description."""
        terms = [w.lower() for w in (words.split() if isinstance(words, str) else words) if w.strip()]
        scored = []
        for e in self.entries.values():
            score = _score(e, terms)
            if score is not None:
                scored.append((-score, e.name, e))
        return [e for _, _, e in sorted(scored, key=lambda t: (t[0], t[1]))]


def _score(entry: CatalogEntry, terms: Sequence[str]) -> int | None:
    names = [entry.name, *(entry.variant_name(v) for v in entry.variants)]
    # `qwen2.5` is also `qwen`: a family word finds the entry without its version.
    parts = {q for n in names for p in re.split(r"[-_]", n) for q in (p, re.sub(r"[0-9.]+$", "", p)) if q}
    rest = " ".join([*entry.sizes, *entry.quants, *(v.source.lower() for v in entry.variants), entry.task.value,
                     entry.description.lower()])
    total = 0
    for t in terms:
        if t in parts or t == entry.name:
            total += 4 if entry.name.startswith(t) else 3
        elif any(t in n for n in names):
            total += 2
        elif t in rest:
            total += 1
        else:
            return None
    return total


def _resolved(entry: CatalogEntry, v: CatalogVariant) -> CatalogModel:
    return CatalogModel(name=entry.variant_name(v), entry=entry.name, size=v.size, quant=v.quant, source=v.source,
                        revision=v.revision, task=entry.task, max_model_len=v.max_model_len or entry.max_model_len,
                        weights_gib=v.weights_gib, note=v.note, origin=entry.origin)


def validate_catalog_name(name: str, where: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ConfigError("catalog", f"{where}: {name!r} is not a model name (1-63 lowercase letters, digits, "
                          "'.', '_' or '-')")
    return name


def is_catalog_name(source: str) -> bool:
    """A source that names a catalog entry rather than weights: no '/', no scheme, not a path."""
    return bool(NAME_RE.fullmatch(source.strip()))


def parse_catalog(text: str, origin: str) -> dict[str, CatalogEntry]:
    """The entries of one catalog file; ConfigError("catalog", "<origin>: models.<name>.<key>: ...")."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("catalog", f"{origin}: not valid TOML: {e}") from None
    unknown = set(data) - {"models"}
    if unknown:
        raise ConfigError("catalog", f"{origin}: {sorted(unknown)[0]}: unknown table (entries go in "
                          "[models.\"NAME\"])")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError("catalog", f"{origin}: models: must be a table of entries")
    out = {}
    for name, raw in models.items():
        try:
            out[name] = _entry(name, raw, origin)
        except ValidationError as e:
            raise ConfigError("catalog", f"{origin}: models.{name}{'.' + e.field if e.field else ''}: "
                              f"{e.message}") from None
    return out


def _entry(name: str, raw: object, origin: str) -> CatalogEntry:
    validate_catalog_name(name, f"{origin}: models")
    if not isinstance(raw, dict):
        raise ValidationError("", "must be a table")
    _known(raw, _ENTRY_KEYS, "")
    try:
        task = Task(_opt(raw, "task", str) or "generate")
    except ValueError:
        raise ValidationError("task", f"must be one of {', '.join(t.value for t in Task)}") from None
    names = _opt(raw, "names", str) or ""
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, list) or not variants_raw:
        raise ValidationError("variants", "must list at least one variant {size, quant, source, ...}")
    variants = tuple(_variant(v, i) for i, v in enumerate(variants_raw))
    seen: set[tuple[str, str]] = set()
    for i, v in enumerate(variants):
        if (v.size, v.quant) in seen:
            raise ValidationError(f"variants[{i}]", f"size {v.size} quant {v.quant} is listed twice")
        seen.add((v.size, v.quant))
    if len({v.size for v in variants}) > 1 and names and "{size}" not in names:
        raise ValidationError("names", "must contain {size}: the entry has several sizes")
    return CatalogEntry(name=name, task=task, variants=variants, names=names,
                        description=_opt(raw, "description", str) or "",
                        max_model_len=_positive(raw, "max_model_len"), origin=origin)


def _variant(raw: object, i: int) -> CatalogVariant:
    where = f"variants[{i}]"
    if not isinstance(raw, dict):
        raise ValidationError(where, "must be a table {size, quant, source, ...}")
    _known(raw, _VARIANT_KEYS, f"{where}.")
    size = _req(raw, "size", where)
    if not SIZE_RE.fullmatch(size):
        raise ValidationError(f"{where}.size", f"{size!r} is not a size such as 7b, 0.5b, 8x7b or 30b-a3b")
    quant = _req(raw, "quant", where)
    if quant in UNSUPPORTED_QUANTS:
        raise ValidationError(f"{where}.quant", UNSUPPORTED_QUANTS[quant])
    if quant not in QUANTS:
        raise ValidationError(f"{where}.quant", f"must be one of {', '.join(QUANTS)}")
    source = _req(raw, "source", where)
    revision = _opt(raw, "revision", str, where)
    try:
        parse_source(source, revision)
    except ValidationError as e:
        raise ValidationError(f"{where}.{e.field}", e.message) from None
    gib = _opt(raw, "weights_gib", (int, float), where) or 0.0
    if gib < 0 or gib != gib:
        raise ValidationError(f"{where}.weights_gib", "must be a size in GiB, 0 or more")
    return CatalogVariant(size=size, quant=quant, source=source, revision=revision, weights_gib=float(gib),
                          max_model_len=_positive(raw, "max_model_len", where),
                          note=_opt(raw, "note", str, where) or "")


def _known(raw: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ValidationError(f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")


def _opt(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValidationError(f"{where + '.' if where else ''}{key}", f"must be a {names}")
    return value


def _req(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = _opt(raw, key, str, where)
    if not value:
        raise ValidationError(f"{where}.{key}", "is required")
    return str(value)


def _positive(raw: Mapping[str, Any], key: str, where: str = "") -> int | None:
    value: int | None = _opt(raw, key, int, where)
    if value is not None and not 1 <= value <= 1 << 24:
        raise ValidationError(f"{where + '.' if where else ''}{key}", "must be a positive number of tokens")
    return value


def resolve_spec(spec: Mapping[str, Any], catalog: Catalog) -> dict[str, Any]:
    """A load request whose `source` is a catalog name, made a plain model spec (see `resolve_request`)."""
    return resolve_request(spec, catalog)[0]


def resolve_request(spec: Mapping[str, Any], catalog: Catalog) -> tuple[dict[str, Any], CatalogModel | None]:
    """A load request whose `source` is a catalog name, made a plain model spec: source, revision, task and
    max_model_len from the catalog (the request's own revision and max_model_len win), `size` and `quant`
    consumed, `name` defaulting to the catalog name; with the variant it resolved to. Other requests pass
    unchanged, with None (size/quant refused)."""
    out = dict(spec)
    size, quant = _choice(out.pop("size", None), "size"), _choice(out.pop("quant", None), "quant")
    source = out.get("source")
    if not isinstance(source, str) or not is_catalog_name(source):
        if size is not None or quant is not None:
            raise ValidationError("size" if size is not None else "quant",
                                  "size and quant choose a variant of a catalog entry; the source is not a "
                                  "catalog name (see `nebula catalog`)")
        return out, None
    model = catalog.resolve(source.strip(), size, quant)
    task = out.get("task")
    if task is not None and task != model.task.value:
        raise ValidationError("task", f"catalog entry {model.name} serves task {model.task.value}, but the spec "
                              f"says task {task!r}; drop task, or choose a {task} model (nebula catalog search "
                              f"{task})")
    out.setdefault("name", source.strip())
    out["source"] = model.source
    out["task"] = model.task.value
    if out.get("revision") is None and model.revision is not None:
        out["revision"] = model.revision
    if out.get("max_model_len") is None and model.max_model_len is not None:
        out["max_model_len"] = model.max_model_len
    return out, model


def _choice(value: object, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(key, "must be a non-empty string")
    return value.strip().lower()
