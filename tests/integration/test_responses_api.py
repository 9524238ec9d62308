"""The Responses API and the tokenizer through Nebula (gateway -> vLLM CPU engines), with the real `openai` SDK.

`pair` is two replicas of the tiny chat model (api_fixtures.py); a stored response lives in the memory of the
one engine that made it. The gateway names each response for its replica, so every follow-up (a turn with
previous_response_id, retrieve, cancel) must reach that replica: proved by the engine finding the previous
response at all (another engine answers 404), by the id's replica token, and by the gateway's pick counter of
that replica. A second gateway process, sharing nothing with the first but etcd, continues the conversation.
A random model never emits EOS on its own: every request sets max_output_tokens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from openai.types.responses import FunctionTool, FunctionToolParam, Response, ResponseCompletedEvent

from nebula.core.response_ids import replica_token, token_of
from tests.harness.cluster import wait_until
from tests.harness.ports import free_port
from tests.integration.api_fixtures import CHAT_MODEL, PAIR_MODEL, ApiCluster

pytestmark = [pytest.mark.engine, pytest.mark.etcd]

WEATHER: FunctionToolParam = {
    "type": "function", "name": "get_weather", "description": "The weather of a city", "strict": False,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["paris", "tokyo"]}},
                   "required": ["city"], "additionalProperties": False},
}
GONE = "resp_" + "0" * 16 + "_" + "1" * 32


@pytest.fixture(scope="module")
def client(api_cluster: ApiCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_cluster.base_url, api_key="unused", max_retries=0, timeout=120)


def replicas_by_token(api_cluster: ApiCluster) -> dict[str, str]:
    """The READY replicas of `pair`, by the token their response ids carry (computed as any gateway does)."""
    with urllib.request.urlopen(f"{api_cluster.gateway_url}/v1/admin/models/{PAIR_MODEL}", timeout=10) as resp:
        instances = json.loads(resp.read())["instances"]
    return {replica_token(i["instance"], i["node"], i["endpoint"].rstrip("/"), i["restarts"]): i["instance"]
            for i in instances if i["phase"] == "ready"}


def picks(gateway_url: str) -> dict[str, float]:
    """The gateway's pick counter of each `pair` replica (nebula_gateway_picks_total)."""
    with urllib.request.urlopen(f"{gateway_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name == "nebula_gateway_picks_total":
            labels, _, value = rest.partition("} ")
            fields = dict(kv.split("=", 1) for kv in labels.split(","))
            if fields.get("model") == f'"{PAIR_MODEL}"':
                out[fields["instance"].strip('"')] = float(value)
    return out


def answered(response: Response) -> bool:
    """Done with some output: completed, or cut at max_output_tokens (a random model never stops by itself)."""
    cut = response.status == "incomplete" and response.incomplete_details is not None \
        and response.incomplete_details.reason == "max_output_tokens"
    return (response.status == "completed" or cut) and bool(response.output)


def test_a_conversation_stays_on_the_replica_that_holds_it(api_cluster: ApiCluster, client: openai.OpenAI) -> None:
    replicas = replicas_by_token(api_cluster)
    assert len(replicas) == 2
    homes: set[str] = set()
    conversations = 0
    # Each conversation's first input differs: prefix affinity homes each by its own key, so distinct ones
    # spread over both replicas (all of 12 on one replica: a 1 in 2,048 chance).
    while conversations < 12 and (conversations < 4 or len(homes) < 2):
        conversations += 1
        first = client.responses.create(model=PAIR_MODEL, input=f"Tell me story number {conversations}.",
                                        max_output_tokens=8)
        assert answered(first)
        home = replicas[token_of(first.id) or ""]
        homes.add(home)
        before = picks(api_cluster.gateway_url)
        rid = first.id
        for turn in range(3):
            nxt = client.responses.create(model=PAIR_MODEL, input=f"And then? ({turn})", max_output_tokens=8,
                                          previous_response_id=rid)
            assert nxt.previous_response_id == rid  # the engine found it: only the holder could
            assert replicas[token_of(nxt.id) or ""] == home
            rid = nxt.id
        after = picks(api_cluster.gateway_url)
        assert after[home] - before.get(home, 0) == 3
        assert all(after.get(i, 0) == before.get(i, 0) for i in replicas.values() if i != home)
        got = client.responses.retrieve(rid)
        assert got.id == rid and got.previous_response_id is not None
    assert homes == set(replicas.values())


def test_streamed_with_a_tool_then_retrieved_and_cancelled(api_cluster: ApiCluster, client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=PAIR_MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=24, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    last = events[-1]
    assert isinstance(last, ResponseCompletedEvent)
    done = last.response
    print(f"\nstreamed with a named tool: {len(events)} events, output {[o.type for o in done.output]}")
    assert token_of(done.id) in replicas_by_token(api_cluster)
    got = client.responses.retrieve(done.id)
    assert got.id == done.id and got.status == done.status
    assert [o.type for o in done.output] == ["function_call"]  # the named tool, forced by vLLM's grammar
    assert isinstance(got.tools[0], FunctionTool) and got.tools[0].name == "get_weather"
    # A finished response cannot be cancelled: vLLM's own answer, relayed from the replica that holds it.
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(done.id)
    assert "Cannot cancel a synchronous response" in e.value.message
    # Not streamed, with the same tool, continuing the streamed one on its replica.
    nxt = client.responses.create(model=PAIR_MODEL, input="And in Tokyo?", tools=[WEATHER], max_output_tokens=8,
                                  previous_response_id=done.id)
    assert answered(nxt) and token_of(nxt.id) == token_of(done.id)


def test_gone_and_made_up_ids_are_clear_404s(client: openai.OpenAI) -> None:
    calls: list[Callable[[], object]] = [
        lambda: client.responses.retrieve(GONE), lambda: client.responses.cancel(GONE),
        lambda: client.responses.create(model=PAIR_MODEL, input="hi", max_output_tokens=4, previous_response_id=GONE)]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "response_replica_gone" and "Start the conversation again" in e.value.message
    for garbage in ("resp_nope", "nope", GONE.replace("_1", "_x")):
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.retrieve(garbage)
        assert e.value.code == "response_not_found"


@pytest.fixture
def second_gateway(api_cluster: ApiCluster) -> Iterator[str]:
    """Another gateway process on its own port, sharing nothing with the first but etcd."""
    port = free_port()
    env = {**api_cluster.cluster.env(), "NEBULA_GATEWAY_PORT": str(port)}
    log = (api_cluster.cluster.workdir / "gateway-second.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "nebula", "gateway", "run"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(picks_ready(url)) == 2, 60, "second gateway sees both pair replicas")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def picks_ready(url: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{url}/v1/admin/replicas", timeout=5) as resp:
            return [r["instance"] for r in json.loads(resp.read())["models"].get(PAIR_MODEL, {}).get("ready", [])]
    except OSError:
        return []


def test_a_follow_up_through_another_gateway(api_cluster: ApiCluster, client: openai.OpenAI,
                                             second_gateway: str) -> None:
    other = openai.OpenAI(base_url=second_gateway + "/v1", api_key="unused", max_retries=0, timeout=120)
    first = client.responses.create(model=PAIR_MODEL, input="Hello", max_output_tokens=8)
    rid = first.id
    for gateway in (other, client, other):  # back and forth: no gateway keeps anything about the conversation
        nxt = gateway.responses.create(model=PAIR_MODEL, input="More", max_output_tokens=8, previous_response_id=rid)
        assert nxt.previous_response_id == rid and token_of(nxt.id) == token_of(first.id)
        rid = nxt.id
    assert other.responses.retrieve(rid).id == rid


def test_tokenize_and_detokenize_round_trip(api_cluster: ApiCluster) -> None:
    text = "The quick brown fox"
    for prefix in ("", "/v1"):
        tokens = post(api_cluster.gateway_url + prefix + "/tokenize", {"model": CHAT_MODEL, "prompt": text,
                                                                       "add_special_tokens": False})
        assert tokens["count"] == len(tokens["tokens"]) > 0
        back = post(api_cluster.gateway_url + prefix + "/detokenize", {"model": CHAT_MODEL, "tokens": tokens["tokens"]})
        assert back["prompt"].strip() == text
    chat = post(api_cluster.gateway_url + "/tokenize",
                {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}]})
    assert chat["count"] > tokens["count"]  # the chat template adds its own tokens


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out
