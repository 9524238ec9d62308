"""The engine spec files the agent writes for `nebula engine run <instance>` (<run_dir>/engines/<instance>.json)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from nebula.core.engine_spec import EngineSpec
from nebula.errors import ValidationError


class SpecFiles:
    def __init__(self, run_dir: str) -> None:
        self.dir = Path(run_dir) / "engines"

    def path(self, instance: str) -> Path:
        return self.dir / f"{instance}.json"

    def read_all(self) -> dict[str, EngineSpec]:
        specs: dict[str, EngineSpec] = {}
        if not self.dir.is_dir():
            return specs
        for f in self.dir.glob("*.json"):
            try:
                specs[f.stem] = EngineSpec.from_dict(json.loads(f.read_text()), str(f))
            except (OSError, ValueError, ValidationError):
                continue  # a spec we cannot read is one we did not write: the plan removes or rewrites it
        return specs

    def write(self, spec: EngineSpec) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Engines run as another user (nebula-engine): they read their spec, whatever the agent's umask, and
        # cannot change it (the agent owns the file and the directory).
        with contextlib.suppress(PermissionError):  # a directory the agent does not own: leave it as it is
            self.dir.chmod(0o755)
        tmp = self.path(spec.instance).with_suffix(".tmp")
        tmp.write_text(json.dumps(spec.to_dict(), indent=2))
        tmp.chmod(0o644)
        os.replace(tmp, self.path(spec.instance))  # atomic: the engine never reads half a spec

    def remove(self, instance: str) -> None:
        self.path(instance).unlink(missing_ok=True)
