"""What the OpenAI API tests (test_openai_api.py, test_openai_embed_rerank.py, test_openai_errors.py) share:
the fixtures `client` (the real `openai` client) and `gateway` (the gateway's URL), module-scoped over the
session-wide cluster of api_fixtures.py, and a chat prompt.

That cluster serves `chat` (tiny-llama, a random model whose tool calls and JSON are forced by structured
outputs), `embed` (tiny BERT, 64 dimensions) and `rerank` (tiny BERT cross-encoder). A random model never emits
EOS on its own: every request sets max_tokens. A test module imports the fixtures its tests take by their
function names, `client_fixture,  # noqa: F401` (the name= keeps a test's argument from shadowing the import).
"""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.api_fixtures import ApiCluster

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather like?"}]


@pytest.fixture(scope="module", name="client")
def client_fixture(api_cluster: ApiCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_cluster.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module", name="gateway")
def gateway_fixture(api_cluster: ApiCluster) -> str:
    return api_cluster.gateway_url
