"""Hostile input: schemathesis fuzzes the gateway from its own /openapi.json (valid and invalid bodies, path
parameters, every operation) and no answer may be a server error.

The gateway runs in this process on loopback (its own thread and loop) with an in-memory store and a fake
engine registered as the READY replica of each model, so a valid request goes the whole way and back.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from schemathesis import Case, GenerationMode, Response
from schemathesis.core.result import Ok

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import CatalogConfig, GatewayConfig
from nebula.core.model import ModelSpec, Task, dumps
from nebula.services.catalog_files import load_catalog
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.openapi import openapi_document
from tests.unit.fake_engine import FakeEngine, put_instance
from tests.unit.served_gateway import served_gateway

ADMIN = "fuzz-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CASES = 1200
FOCUSED_CASES = 30
# A 503 the document promises for a model loaded by an earlier case (no replica can be ready in here).
EXPECTED_503 = frozenset({"model_not_ready"})


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    engine = FakeEngine("fuzz")

    async def prepare(store: MemoryStore) -> None:
        endpoint = await engine.start()
        for name, task in (("m", Task.GENERATE), ("e", Task.EMBED), ("r", Task.RERANK), ("t", Task.TRANSCRIBE)):
            await store.put(keys.model_key(name), dumps(ModelSpec(name=name, source="/models/x", task=task).to_dict()))
            await put_instance(store, name, endpoint, model=name, task=task)

    cfg = GatewayConfig(admin_key_hashes=(hashlib.sha256(ADMIN.encode()).hexdigest(),), load_poll_s=0,
                        max_body_bytes=64 * 1024)
    # The shipped catalog: /v1/admin/catalog answers with real entries.
    with served_gateway(cfg, prepare, engine.stop, catalog=load_catalog(CatalogConfig())) as gateway:
        yield gateway.url


def test_the_served_document_is_the_module_s(gateway_url: str) -> None:
    served = requests.get(f"{gateway_url}/openapi.json", headers=AUTH, timeout=5).json()
    assert served == openapi_document()


def test_every_route_is_documented(gateway_url: str) -> None:
    app = build_gateway_app(GatewayConfig(), MemoryStore(), CollectorRegistry())
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}
    # The web console's routes (/ui/...) are its page's, not a client API (tests/unit/test_console_http.py).
    routes = {(m, p) for m, p in routes if not p.startswith("/ui")}
    undocumented = routes - documented - {("get", "/metrics"), ("get", "/openapi.json")}
    assert not undocumented, f"routes missing from openapi.py: {sorted(undocumented)}"


def test_fuzzing_finds_no_server_error(gateway_url: str) -> None:
    schema = schemathesis.openapi.from_dict(requests.get(f"{gateway_url}/openapi.json", headers=AUTH, timeout=5).json())
    schema.config.update(base_url=gateway_url)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself must be valid
        operations.append(result.ok())
    strategy = st.one_of([op.as_strategy(mode) for op in operations
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    session = requests.Session()
    statuses: Counter[int] = Counter()
    per_operation: Counter[str] = Counter()
    errors: list[str] = []

    def fuzz(strategy: st.SearchStrategy[Case[Any]], examples: int) -> None:
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case: Case[Any]) -> None:
            # schemathesis makes up Authorization headers from the bearer scheme; one case in eight keeps them
            # (hostile headers for the auth middleware), the others carry the admin key and get past it.
            if sum(statuses.values()) % 8:
                case.headers.pop("Authorization", None)  # a case-insensitive dict
                case.headers.update(AUTH)
            response = case.call(session=session, timeout=10)
            statuses[response.status_code] += 1
            per_operation[case.operation.label] += 1
            if response.status_code >= 500:
                code = _error_code(response)
                if not ((response.status_code == 503 and code in EXPECTED_503)
                        or _unsupported_coding_refused(case, response.status_code, code)):
                    errors.append(f"{response.status_code} {code} for {case.operation.label}: "
                                  f"{case.as_curl_command()}")

        run()

    fuzz(strategy, CASES)
    # A random mix can leave an operation with a hard-to-generate body (a spec's many optional objects) with no
    # draw at all; each such one is then fuzzed on its own, so every operation is always covered.
    for op in operations:
        if op.label not in per_operation:
            fuzz(st.one_of([op.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]),
                 FOCUSED_CASES)
    print(f"\n{sum(statuses.values())} cases; statuses {dict(sorted(statuses.items()))}; "
          f"per operation {dict(sorted(per_operation.items()))}")
    assert not errors, "\n".join(errors[:10])
    assert sum(statuses.values()) >= 1000
    assert set(per_operation) == {op.label for op in operations}  # every operation was fuzzed


def _unsupported_coding_refused(case: Case[Any], status: int, code: str | None) -> bool:
    """A made-up Transfer-Encoding header answered 501, as RFC 9112 6.1 says a server should answer a transfer
    coding it does not implement (tests/unit/test_http1_request.py holds the server to it): not a fault."""
    coding = case.headers.get("Transfer-Encoding")  # a case-insensitive dict
    return (status == 501 and code == "not_implemented" and coding is not None
            and [c.strip().lower() for c in str(coding).split(",")] != ["chunked"])


def _error_code(response: Response) -> str | None:
    """The OpenAI shape's error code; Anthropic's shape (/v1/messages*) has none, so its 503 for a model with no
    ready replica is known by its message (the one forward.py answers with model_not_ready)."""
    try:
        error = response.json()["error"]
        if response.json().get("type") == "error":
            return "model_not_ready" if "has no ready replica yet" in str(error["message"]) else None
        return str(error["code"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
