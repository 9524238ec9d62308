"""Embeddings, rerank and score through Nebula (gateway -> vLLM CPU engines), with the real `openai` client
where it has the endpoint (the cluster and the fixtures: openai_api_fixtures.py)."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import openai
import pytest

from tests.harness.cluster import post_json
from tests.integration.api_fixtures import EMBED_MODEL, RERANK_MODEL
from tests.integration.openai_api_fixtures import (
    client_fixture,  # noqa: F401 (the fixture client)
    gateway_fixture,  # noqa: F401 (the fixture gateway)
)

pytestmark = [pytest.mark.engine, pytest.mark.etcd]


EMBED_DIM = 64


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def decode_base64_floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    assert len(raw) % 4 == 0, f"base64 embedding of {len(raw)} bytes is not float32s"
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# --- embeddings -------------------------------------------------------------------------------------


def test_embeddings_float(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model=EMBED_MODEL, input=["hello world", "def main(): pass"],
                                   encoding_format="float")
    assert out.model == EMBED_MODEL
    assert [d.index for d in out.data] == [0, 1]
    for d in out.data:
        assert len(d.embedding) == EMBED_DIM, f"dimension {len(d.embedding)}"
        assert abs(norm(d.embedding) - 1.0) < 1e-3, f"not unit norm: {norm(d.embedding)}"
    assert out.data[0].embedding != out.data[1].embedding
    assert out.usage.prompt_tokens > 0


def test_embeddings_base64_matches_float(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="float")
    encoded = client.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="base64")
    raw: Any = encoded.data[0].embedding  # the client leaves an explicit base64 answer as the string
    assert isinstance(raw, str), f"expected a base64 string, got {type(raw).__name__}"
    decoded = decode_base64_floats(raw)
    assert len(decoded) == EMBED_DIM
    diff = max(abs(a - b) for a, b in zip(decoded, floats.data[0].embedding, strict=True))
    assert diff < 1e-5, f"base64 and float embeddings differ by {diff}"


def test_embeddings_of_token_ids(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model=EMBED_MODEL, input=[[5, 6, 7], [8, 9]], encoding_format="float")
    assert [len(d.embedding) for d in out.data] == [EMBED_DIM, EMBED_DIM]


def test_embeddings_client_default_encoding(client: openai.OpenAI) -> None:
    """The openai client asks for base64 by default and decodes it itself."""
    default = client.embeddings.create(model=EMBED_MODEL, input="hello world")
    floats = client.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="float")
    assert len(default.data[0].embedding) == EMBED_DIM
    diff = max(abs(a - b) for a, b in zip(default.data[0].embedding, floats.data[0].embedding, strict=True))
    assert diff < 1e-5, f"decoded default embedding differs from float by {diff}"


# --- rerank and score -------------------------------------------------------------------------------

DOCUMENTS = ["def add(a, b): return a + b", "the cat sat on the mat", "import os", "class Stack: pass"]


def rerank(gateway: str, **fields: Any) -> dict[str, Any]:
    status, body = post_json(gateway + "/v1/rerank", {"model": RERANK_MODEL, "query": "a python function",
                                                 "documents": DOCUMENTS, **fields})
    assert status == 200, f"rerank -> {status}: {body}"
    return body


def assert_sorted_results(results: list[dict[str, Any]]) -> None:
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True), f"results not sorted by relevance: {scores}"
    indices = [r["index"] for r in results]
    assert len(set(indices)) == len(indices) and all(0 <= i < len(DOCUMENTS) for i in indices), indices


def test_rerank_all_documents_sorted(gateway: str) -> None:
    body = rerank(gateway)
    assert body["model"] == RERANK_MODEL
    assert len(body["results"]) == len(DOCUMENTS)
    assert_sorted_results(body["results"])


def test_rerank_top_n_and_documents(gateway: str) -> None:
    body = rerank(gateway, top_n=2, return_documents=True)
    results = body["results"]
    assert len(results) == 2, f"top_n=2 not honoured: {results}"
    assert_sorted_results(results)
    best = rerank(gateway)["results"][:2]
    assert [r["index"] for r in results] == [r["index"] for r in best], "top_n did not keep the best two"
    for r in results:
        assert r["document"]["text"] == DOCUMENTS[r["index"]], f"document not returned: {r}"


def test_rerank_return_documents_false_omits_documents(gateway: str) -> None:
    """Cohere's shape: with return_documents=false a result is only index and relevance_score."""
    results = rerank(gateway, top_n=2, return_documents=False)["results"]
    assert len(results) == 2
    for r in results:
        assert not (r.get("document") or {}).get("text"), f"document returned although not asked for: {r}"


@pytest.mark.parametrize("sides", [("text_1", "text_2"), ("queries", "documents")])
def test_score(gateway: str, sides: tuple[str, str]) -> None:
    first, second = sides
    status, body = post_json(gateway + "/v1/score", {"model": RERANK_MODEL, first: "a python function",
                                                second: DOCUMENTS[:2]})
    assert status == 200, f"score -> {status}: {body}"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(isinstance(d["score"], float) for d in body["data"]), body
    by_index = {r["index"]: r["relevance_score"] for r in rerank(gateway)["results"]}
    for d in body["data"]:
        assert abs(d["score"] - by_index[d["index"]]) < 1e-4, "score and rerank disagree on the same pair"
