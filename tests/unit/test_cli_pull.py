"""`nebula pull`: what it asks the admin API, what it prints while following, how it ends."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import pytest

from nebula.cli.client import EXIT_FAILURE, EXIT_TIMEOUT, CliError
from nebula.cli.pull import follow, pull_command


class ScriptedClient:
    """An AdminClient whose GET /v1/admin/pulls/<id> answers follow a script, one per call."""

    def __init__(self, reports: list[dict[str, dict[str, Any]]]) -> None:
        self.reports = reports
        self.calls: list[tuple[str, str, Mapping[str, Any] | None]] = []

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        self.calls.append((method, path, body))
        if method == "POST":
            return {"id": "p1", "source": "hf://org/m", "nodes": ["a", "b"]}
        if method == "DELETE":
            return {"id": "p1", "deleted": True}
        nodes = self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]
        return {"id": "p1", "source": "hf://org/m", "nodes": nodes}


def st(phase: str, message: str = "", progress: float | None = None) -> dict[str, Any]:
    return {"phase": phase, "message": message, "progress": progress}


def args(target: str, **kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"target": target, "nodes": "", "revision": None, "timeout": 0, "no_wait": False,
                            "json": False}
    return argparse.Namespace(**(base | kw))


def test_follows_until_every_node_has_it_then_withdraws(capsys: pytest.CaptureFixture[str]) -> None:
    client = ScriptedClient([
        {"a": st("waiting", "the node has not reported yet"), "b": st("downloading", "downloading 10%", 0.1)},
        {"a": st("ready", "/cache/x", 1.0), "b": st("downloading", "downloading 60%", 0.6)},
        {"a": st("ready", "/cache/x", 1.0), "b": st("ready", "/cache/x", 1.0)},
    ])
    assert pull_command(client, args("org/m", nodes="a, b", revision="v2")) == 0  # type: ignore[arg-type]
    assert client.calls[0] == ("POST", "/v1/admin/pulls", {"source": "org/m", "revision": "v2", "nodes": ["a", "b"]})
    assert client.calls[-1] == ("DELETE", "/v1/admin/pulls/p1", None)
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "pulling hf://org/m onto a, b",
        "  a: waiting the node has not reported yet", "  b: downloading downloading 10%",
        "  a: ready", "  b: downloading downloading 60%",
        "  b: ready",
        "hf://org/m is cached on a, b",
    ]


def test_a_model_name_pulls_that_models_source() -> None:
    client = ScriptedClient([{"a": st("ready")}])
    pull_command(client, args("chat", no_wait=True))  # type: ignore[arg-type]
    assert client.calls == [("POST", "/v1/admin/pulls", {"model": "chat"})]


def test_a_failed_node_fails_the_pull() -> None:
    client = ScriptedClient([{"a": st("ready"), "b": st("failed", "hf://org/m: no such repo on the hub")}])
    with pytest.raises(CliError) as e:
        follow(client, "p1", timeout_s=0, as_json=False, sleep=lambda s: None)  # type: ignore[arg-type]
    assert e.value.code == EXIT_FAILURE and str(e.value) == (
        "pull of hf://org/m failed on b: hf://org/m: no such repo on the hub")
    assert client.calls[-1][0] == "DELETE"


def test_timeout_leaves_the_pull_running() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    client = ScriptedClient([{"a": st("downloading", "downloading 1%", 0.01)}])
    with pytest.raises(CliError) as e:
        follow(client, "p1", timeout_s=3, as_json=False, sleep=sleep, clock=lambda: now[0])  # type: ignore[arg-type]
    assert e.value.code == EXIT_TIMEOUT and "goes on in the background" in str(e.value)
    assert all(method != "DELETE" for method, _, _ in client.calls)
