"""Model families: the tool-call parser, reasoning parser and extra `vllm serve` flags a model family needs.

They come from the profiles files (shipped: etc/nebula/profiles.toml; operators' own:
/etc/nebula/profiles.d/*.toml, see [models] profiles_files). Each `[[family]]` entry names what it matches:

    [[family]]
    name = "qwen3"                       # shown as the profile's family
    model_types = ["qwen3", "qwen3_moe"] # config.json model_type, any of
    architectures = []                   # config.json architectures[0], any of
    sources = ["*qwen3*"]                # globs on the source (repo id, or a directory's last part), any of
    tool_call_parser = "hermes"          # --enable-auto-tool-choice --tool-call-parser=hermes
    reasoning_parser = "qwen3"           # --reasoning-parser=qwen3
    engine_args = []                     # more flags, each as one `--flag=value` string
    disabled = false                     # true: an operator turns a shipped entry off (by its name)

An entry matches when every criterion it sets matches (it must set at least one). Among the matches, an
entry with `sources` beats one without (a repo name is more specific than an architecture), and then the
later entry wins: later in its file, or in a later file. An entry whose name an earlier file already used
replaces that entry. Pure: the caller reads the files and passes their text.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nebula.core.engine_args import flag_name, never_allowed
from nebula.core.profile import PARSER_RE
from nebula.errors import ConfigError

_KEYS = frozenset({"name", "model_types", "architectures", "sources", "tool_call_parser", "reasoning_parser",
                   "engine_args", "disabled"})


@dataclass(frozen=True)
class FamilyRule:
    name: str
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    tool_call_parser: str = ""
    reasoning_parser: str = ""
    engine_args: tuple[str, ...] = ()
    disabled: bool = False
    origin: str = ""
    """The file that defined it, for `derived`."""

    def matches(self, model_type: str, architecture: str, source_name: str) -> bool:
        if self.disabled or not (self.model_types or self.architectures or self.sources):
            return False
        if self.model_types and model_type not in self.model_types:
            return False
        if self.architectures and architecture not in self.architectures:
            return False
        return not self.sources or _source_matches(self.sources, source_name)

    def why(self) -> str:
        parts = [f"model_type {'/'.join(self.model_types)}" if self.model_types else "",
                 f"architecture {'/'.join(self.architectures)}" if self.architectures else "",
                 f"source matching {' or '.join(self.sources)}" if self.sources else ""]
        return f"profiles entry {self.name!r} of {self.origin or 'the profiles file'}: " + ", ".join(
            p for p in parts if p)


@dataclass(frozen=True)
class Families:
    rules: tuple[FamilyRule, ...] = ()

    def match(self, model_type: str, architecture: str, source_name: str) -> FamilyRule | None:
        best: tuple[bool, int] | None = None
        found: FamilyRule | None = None
        for i, rule in enumerate(self.rules):
            if rule.matches(model_type, architecture, source_name):
                rank = (bool(rule.sources), i)
                if best is None or rank > best:
                    best, found = rank, rule
        return found

    def get(self, name: str) -> FamilyRule | None:
        return next((r for r in self.rules if r.name == name), None)


def merge(files: Iterable[Sequence[FamilyRule]]) -> Families:
    """The entries of several files in order: a later entry of the same name replaces the earlier one."""
    rules: list[FamilyRule] = []
    for entries in files:
        for rule in entries:
            rules = [r for r in rules if r.name != rule.name]
            rules.append(rule)
    return Families(tuple(rules))


def parse_profiles(text: str, source: str) -> tuple[FamilyRule, ...]:
    """The `[[family]]` entries of one profiles file; ConfigError names the file and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{source}: not valid TOML: {e}") from None
    unknown = set(data) - {"family"}
    if unknown:
        raise ConfigError("", f"{source}: unknown table {sorted(unknown)[0]!r} (only [[family]] entries)")
    entries = data.get("family", [])
    if not isinstance(entries, list):
        raise ConfigError("", f"{source}: family must be an array of tables ([[family]])")
    rules = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        rule = _rule(entry, f"{source}: family[{i}]", source)
        if rule.name in seen:
            raise ConfigError("", f"{source}: family[{i}].name: {rule.name!r} is defined twice in this file")
        seen.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def _rule(entry: object, where: str, source: str) -> FamilyRule:
    if not isinstance(entry, dict):
        raise ConfigError("", f"{where}: must be a table")
    for key in entry:
        if key not in _KEYS:
            raise ConfigError("", f"{where}.{key}: unknown key (known: {', '.join(sorted(_KEYS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not PARSER_RE.fullmatch(name):
        raise ConfigError("", f"{where}.name: must be a name of lowercase letters, digits, '_', '.', '-'")
    where = f"{where} ({name})"
    lists = {key: _strings(entry, key, where) for key in ("model_types", "architectures", "sources",
                                                          "engine_args")}
    disabled = entry.get("disabled", False)
    if not isinstance(disabled, bool):
        raise ConfigError("", f"{where}.disabled: must be true or false")
    if not disabled and not (lists["model_types"] or lists["architectures"] or lists["sources"]):
        raise ConfigError("", f"{where}: set model_types, architectures or sources (else it matches nothing)")
    for arg in lists["engine_args"]:
        flag = flag_name(arg)
        if flag is None:
            raise ConfigError("", f"{where}.engine_args: {arg!r} is not a flag: write each as '--flag=value'")
        if never_allowed(flag):
            raise ConfigError("", f"{where}.engine_args: {flag} can never be passed through engine_args")
    return FamilyRule(name=name, model_types=lists["model_types"], architectures=lists["architectures"],
                      sources=tuple(s.lower() for s in lists["sources"]),
                      tool_call_parser=_parser(entry, "tool_call_parser", where),
                      reasoning_parser=_parser(entry, "reasoning_parser", where),
                      engine_args=lists["engine_args"], disabled=disabled, origin=source)


def _strings(entry: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v and len(v) <= 400 for v in value):
        raise ConfigError("", f"{where}.{key}: must be a list of non-empty strings")
    return tuple(value)


def _parser(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str) or (value and not PARSER_RE.fullmatch(value)):
        raise ConfigError("", f"{where}.{key}: must be a vLLM parser name (lowercase letters, digits, '_', '.', "
                          "'-') or empty")
    return value


def _source_matches(globs: tuple[str, ...], source_name: str) -> bool:
    name = source_name.strip().rstrip("/").lower()
    names = {name, name.rsplit("/", 1)[-1], name.removeprefix("hf://").removeprefix("modelscope://")}
    return any(fnmatch.fnmatchcase(n, g) for g in globs for n in names)
