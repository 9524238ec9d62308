"""EtcdStore against real etcd servers that demand TLS (with client certificates) or user/password auth,
configured the way services are: [cluster] settings through runtime.open_store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from aetcd import rpc

from nebula.adapters.etcd import EtcdStore
from nebula.adapters.etcd_connection import EtcdSecurity
from nebula.core.config import ClusterConfig, NebulaConfig
from nebula.core.store import KeyValue, StoreUnavailableError
from nebula.errors import ConfigError, PermanentError
from nebula.services.runtime import open_store
from tests.harness.etcd_tls import TlsEtcdServer, launch_tls_etcd
from tests.harness.mirrors import follow_raw
from tests.harness.tls import Pki, make_pki
from tests.store_contract import stop, wait_until

pytestmark = pytest.mark.etcd

PASSWORD = "s3cret-for-tests"
TOKEN_TTL_S = 1


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_etcd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsEtcdServer]:
    server = launch_tls_etcd(tmp_path_factory.mktemp("etcd-mtls"), pki, client_cert_auth=True)
    try:
        yield server
    finally:
        server.stop()


def cluster(endpoint: str, pki: Pki, **kw: Any) -> NebulaConfig:
    return NebulaConfig(cluster=ClusterConfig(etcd_endpoints=(endpoint,), etcd_timeout_s=2.0,
                                              etcd_ca_file=str(pki.ca), **kw))


def with_client_cert(pki: Pki) -> dict[str, str]:
    return {"etcd_cert_file": str(pki.client_cert), "etcd_key_file": str(pki.client_key)}


async def test_tls_with_client_certificate_reads_writes_and_watches(mtls_etcd: TlsEtcdServer, pki: Pki) -> None:
    store = await open_store(cluster(mtls_etcd.endpoint, pki, **with_client_cert(pki)))
    updates: asyncio.Queue[dict[str, KeyValue]] = asyncio.Queue()
    task = follow_raw(store, "/tls/", updates.put_nowait)
    try:
        await store.put("/tls/a", b"1")
        assert (await store.get("/tls/a")) is not None
        lease = await store.grant_lease(5)
        assert await store.create("/tls/b", b"2", lease=lease)
        await wait_until(updates, lambda s: set(s) == {"/tls/a", "/tls/b"})
    finally:
        await stop(task)
        await store.close()


async def test_tls_refuses_a_client_without_certificate_or_trust(mtls_etcd: TlsEtcdServer, pki: Pki) -> None:
    no_cert = EtcdStore([mtls_etcd.endpoint], timeout=1.0)  # trusts the system CAs only, no client cert
    try:
        with pytest.raises(StoreUnavailableError):
            await no_cert.get("/tls/a")
    finally:
        await no_cert.close()
    plain = EtcdStore([mtls_etcd.endpoint.replace("https://", "http://")], timeout=1.0)
    try:
        with pytest.raises(StoreUnavailableError):
            await plain.get("/tls/a")
    finally:
        await plain.close()


def test_bad_tls_file_is_a_config_error_naming_the_key(pki: Pki, tmp_path: Path) -> None:
    cfg = cluster("https://127.0.0.1:1", pki, etcd_cert_file=str(tmp_path / "missing.pem"),
                  etcd_key_file=str(pki.client_key))
    with pytest.raises(ConfigError, match=r"^cluster.etcd_cert_file: cannot read .*missing.pem"):
        asyncio.run(open_store(cfg))


# --- user/password auth ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsEtcdServer]:
    """TLS without client certificates (with them etcd would take the certificate's CN as the user) and
    auth enabled: root, and a `nebula` user that may read and write /nebula/ only. Tokens expire after
    TOKEN_TTL_S idle seconds, so the re-authentication path runs within the test."""
    server = launch_tls_etcd(tmp_path_factory.mktemp("etcd-auth"), pki, client_cert_auth=False,
                             extra_args=("--auth-token-ttl", str(TOKEN_TTL_S)))
    try:
        asyncio.run(_enable_auth(server.endpoint.removeprefix("https://"), pki))
        yield server
    finally:
        server.stop()


async def _enable_auth(target: str, pki: Pki) -> None:
    channel = rpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes()))
    try:
        auth = rpc.AuthStub(channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=PASSWORD), timeout=5)
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="nebula", password=PASSWORD), timeout=5)
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="nebula"), timeout=5)
        perm = rpc.Permission(permType=rpc.Permission.READWRITE, key=b"/nebula/",
                              range_end=bytes(aetcd.utils.prefix_range_end(b"/nebula/")))
        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="nebula", perm=perm), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="nebula", role="nebula"), timeout=5)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)
    finally:
        await channel.close()


@pytest.fixture
async def nebula_user_store(auth_etcd: TlsEtcdServer, pki: Pki) -> AsyncIterator[EtcdStore]:
    store = await open_store(cluster(auth_etcd.endpoint, pki, etcd_user="nebula", etcd_password=PASSWORD))
    assert isinstance(store, EtcdStore)
    try:
        yield store
    finally:
        await store.close()


async def test_auth_user_works_within_its_permissions(nebula_user_store: EtcdStore) -> None:
    store = nebula_user_store
    await store.put("/nebula/models/x", b"1")
    assert (await store.get("/nebula/models/x")) is not None
    lease = await store.grant_lease(5)
    await store.keepalive(lease)
    updates: asyncio.Queue[dict[str, KeyValue]] = asyncio.Queue()
    task = follow_raw(store, "/nebula/models/", updates.put_nowait)
    try:
        await wait_until(updates, lambda s: "/nebula/models/x" in s)
    finally:
        await stop(task)
    with pytest.raises(PermanentError):  # outside its role's range: etcd's "permission denied"
        await store.put("/elsewhere", b"1")


async def test_expired_token_is_renewed_and_the_call_goes_through(nebula_user_store: EtcdStore) -> None:
    store = nebula_user_store
    await store.put("/nebula/t/a", b"1")
    updates: asyncio.Queue[dict[str, KeyValue]] = asyncio.Queue()
    task = follow_raw(store, "/nebula/t/", updates.put_nowait)
    try:
        await wait_until(updates, lambda s: "/nebula/t/a" in s)
        # etcd drops a simple token after TOKEN_TTL_S without use; the next call is refused UNAUTHENTICATED,
        # and the store authenticates again and resends it (a real wait: the TTL is etcd's own timer).
        await asyncio.sleep(TOKEN_TTL_S + 1.5)
        kv = await store.get("/nebula/t/a")
        assert kv is not None and kv.value == b"1"
        await store.put("/nebula/t/b", b"2")
        await wait_until(updates, lambda s: "/nebula/t/b" in s)  # the watch opened before goes on
    finally:
        await stop(task)


async def test_missing_or_wrong_credentials_are_refused(auth_etcd: TlsEtcdServer, pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"^cluster: etcd refused this client"):
        await open_store(cluster(auth_etcd.endpoint, pki, etcd_user="nebula", etcd_password="wrong"))
    anonymous = EtcdStore([auth_etcd.endpoint], timeout=2.0, security=EtcdSecurity(ca=pki.ca.read_bytes()))
    try:
        with pytest.raises(PermanentError):
            await anonymous.put("/nebula/anon", b"1")
    finally:
        await anonymous.close()
