"""`nebula update` and `nebula node drain | undrain`: what they ask the admin API, what they print, how they end."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pytest

from nebula.cli.client import EXIT_FAILURE, EXIT_USAGE, CliError
from nebula.cli.main import build_parser
from nebula.cli.rollout import node_command, update


class ScriptedClient:
    """An AdminClient whose GET .../rollout answers follow a script, one per call."""

    def __init__(self, patch: dict[str, Any], polls: list[dict[str, Any]]) -> None:
        self.patch, self.polls = patch, polls
        self.calls: list[tuple[str, str, Mapping[str, Any] | None]] = []

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        self.calls.append((method, path, body))
        if method == "PATCH":
            return self.patch
        if method == "GET":
            return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        return {"node": "n1", "stopping": []}


UPDATED = {"updated": True, "target": "T", "changes": "engine_args: [] -> ['--enforce-eager']", "model": {}}


def poll(text: str, in_progress: bool, state: str | None = None, target: str = "T", **st: Any) -> dict[str, Any]:
    status = {"state": state, "target": target, "replaced": 2, "total": 2, "reason": "", **st} if state else None
    return {"in_progress": in_progress, "text": text, "status": status}


def run(argv: list[str], client: ScriptedClient) -> tuple[int, str]:
    out = io.StringIO()
    code = update(client, build_parser().parse_args(argv), out, sleep=lambda _: None)  # type: ignore[arg-type]
    return code, out.getvalue()


def test_update_follows_the_rollout_until_done() -> None:
    client = ScriptedClient(UPDATED, [poll("starting", True), poll("rolling 0/2 (waiting for m:2)", True, "rolling"),
                                      poll("rolling 1/2", True, "rolling"), poll("done 2/2", False, "done")])
    code, out = run(["update", "m", "--engine-args", "--enforce-eager --dtype=float32"], client)
    assert code == 0
    assert client.calls[0] == ("PATCH", "/v1/admin/models/m", {"engine_args": ["--enforce-eager", "--dtype=float32"]})
    assert out.splitlines() == ["model m updating: engine_args: [] -> ['--enforce-eager']", "  starting",
                                "  rolling 0/2 (waiting for m:2)", "  rolling 1/2", "  done 2/2",
                                "model m updated: 2/2 replicas replaced"]


def test_a_rollback_is_a_one_line_failure_with_the_reason() -> None:
    client = ScriptedClient(UPDATED, [poll("rolled back: new replica m:2 on n1 failed: bad flag", False,
                                           "rolled_back", reason="new replica m:2 on n1 failed: bad flag")])
    with pytest.raises(CliError, match="model m rolled back: new replica m:2 on n1 failed: bad flag") as e:
        run(["update", "m", "--engine-arg=--bogus"], client)
    assert e.value.code == EXIT_FAILURE


def test_no_change_and_no_wait_return_at_once() -> None:
    same = ScriptedClient({"updated": False, "model": {}}, [])
    assert run(["update", "m", "--revision", "main"], same) == (0, "model m: no change\n")
    started = ScriptedClient(UPDATED, [])
    code, out = run(["update", "m", "--max-model-len", "512", "--no-wait"], started)
    assert code == 0 and "follow it with `nebula status`" in out and len(started.calls) == 1
    assert started.calls[0][2] == {"max_model_len": 512}


@pytest.mark.parametrize("argv, message", [
    (["update", "m"], "nothing to update"),
    (["update", "m", "--engine-args", "a", "--engine-arg", "b"], "not both"),
    (["update", "m", "--engine-args", "'unclosed"], "--engine-args"),
])
def test_bad_update_flags_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message) as e:
        run(argv, ScriptedClient(UPDATED, []))
    assert e.value.code == EXIT_USAGE


def test_node_drain_and_undrain() -> None:
    client = ScriptedClient(UPDATED, [])
    out = io.StringIO()
    assert node_command(client, build_parser().parse_args(["node", "drain", "n1", "--force"]), out) == 0  # type: ignore[arg-type]
    assert client.calls[-1] == ("POST", "/v1/admin/nodes/n1/drain", {"force": True})
    assert out.getvalue().startswith("node n1 draining")
    assert node_command(client, build_parser().parse_args(["node", "undrain", "n1"]), out) == 0  # type: ignore[arg-type]
    assert client.calls[-1][:2] == ("DELETE", "/v1/admin/nodes/n1/drain") and client.calls[-1][2] is None
