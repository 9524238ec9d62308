"""The gateway's bootstrap admin key file and HTTPS over loopback, with the real `openai` client (the keys
themselves: test_gateway_keys_api.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.sdnotify import Notifier
from nebula.core import keys
from nebula.core.config import GatewayConfig, NebulaConfig
from nebula.core.model import ModelSpec, dumps
from nebula.errors import ConfigError
from nebula.services.gateway.app import serve_gateway
from nebula.services.gateway.auth import read_digest_file
from nebula.services.gateway.tls import server_ssl_context
from tests.harness.ports import free_port
from tests.harness.tls import make_pki
from tests.unit.fake_engine import FakeEngine, put_instance, until
from tests.unit.gateway_keys_fixtures import (
    ADMIN,
    engine_fixture,  # noqa: F401 (the fixture engine)
    sha,
)

# --- the bootstrap key file, TLS -------------------------------------------------------------------------

def test_digest_file_formats_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "admin.key.sha256"
    assert read_digest_file(str(tmp_path / "absent")) == () and read_digest_file("") == ()
    f.write_text(f"{sha('a')}  -\n# rotated:\n{sha('b').upper()}\n\n")
    assert read_digest_file(str(f)) == (sha("a"), sha("b"))
    f.write_text("nbk_oops-this-is-the-token-itself\n")
    with pytest.raises(ConfigError, match=r"^gateway.admin_key_digest_file: .*:1: not a SHA-256 hex digest"):
        read_digest_file(str(f))


@contextlib.asynccontextmanager
async def serving(cfg: NebulaConfig, store: MemoryStore) -> AsyncIterator[None]:
    notifier = Notifier({})
    task = asyncio.create_task(serve_gateway(cfg, store, CollectorRegistry(), notifier))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_gateway_over_tls_with_the_bootstrap_key_and_the_openai_client(tmp_path: Path, engine: FakeEngine
                                                                              ) -> None:
    pki = make_pki(tmp_path / "pki")
    digest_file = tmp_path / "admin.key.sha256"
    digest_file.write_text(sha(ADMIN) + "  -\n")
    port = free_port()
    cfg = NebulaConfig(gateway=GatewayConfig(port=port, tls_cert_file=str(pki.server_cert),
                                             tls_key_file=str(pki.server_key), admin_key_digest_file=str(digest_file),
                                             load_poll_s=0))
    store = MemoryStore()
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/models/x").to_dict()))
    await put_instance(store, "m", engine.endpoint)
    ctx = pki.client_context()
    url = f"https://127.0.0.1:{port}"
    async with serving(cfg, store), aiohttp.ClientSession() as http:

        async def up() -> bool:
            try:
                async with http.get(f"{url}/healthz", ssl=ctx) as resp:
                    return bool((await resp.json())["ready_replicas"] == 1)
            except aiohttp.ClientConnectionError:
                return False

        await until(up)
        async with http.get(f"{url}/v1/admin/models", ssl=ctx) as resp:
            assert resp.status == 401  # the bootstrap key's digest closed the gateway
        async with http.get(f"{url}/v1/admin/models", ssl=ctx, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):  # plain HTTP on the TLS port
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                await resp.read()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # nobody trusts a self-signed CA
            async with http.get(f"{url}/healthz") as resp:
                await resp.read()
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=ADMIN, max_retries=0,
                                    http_client=openai.DefaultAsyncHttpxClient(verify=ctx))
        reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hello from a"
        stream = await client.chat.completions.create(model="m", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "hello from a"
        await client.close()


def test_bad_certificate_files_stop_the_start_naming_the_key(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"^gateway\.tls_cert_file: .*not a PEM"):
        server_ssl_context(GatewayConfig(tls_cert_file=str(junk), tls_key_file=str(junk)))
    with pytest.raises(ConfigError, match=r"^gateway\.tls_cert_file: cannot read"):
        server_ssl_context(GatewayConfig(tls_cert_file=str(tmp_path / "nope"), tls_key_file=str(junk)))
    assert server_ssl_context(GatewayConfig()) is None
