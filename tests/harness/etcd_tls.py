"""A real etcd that serves its clients over TLS (a `Pki` from tests/harness/tls.py), optionally requiring
a client certificate; everything else is `EtcdServer`'s (data dir, ports, stop/restart/pause)."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.etcd import EtcdServer
from tests.harness.ports import free_port
from tests.harness.tls import Pki

_START_ATTEMPTS = 3


class TlsEtcdServer(EtcdServer):
    def __init__(self, workdir: Path, *, pki: Pki, client_cert_auth: bool, extra_args: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.pki = pki
        self.client_cert_auth = client_cert_auth
        self.extra_args = extra_args

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    def _argv(self) -> list[str]:
        args = ["--cert-file", str(self.pki.server_cert), "--key-file", str(self.pki.server_key)]
        if self.client_cert_auth:  # etcd 3.4 demands client certificates whenever it has a trusted CA
            args += ["--trusted-ca-file", str(self.pki.ca), "--client-cert-auth"]
        return [*super()._argv(), *args, *self.extra_args]

    def _healthy(self) -> bool:
        context = self.pki.client_context(with_client_cert=True)
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=0.5, context=context) as response:
                return b'"true"' in response.read()
        except (urllib.error.URLError, OSError):
            return False


def launch_tls_etcd(workdir: Path, pki: Pki, *, client_cert_auth: bool = True,
                    extra_args: tuple[str, ...] = ()) -> TlsEtcdServer:
    """Start on fresh free ports, retrying with new ones if another job grabbed them meanwhile."""
    binary = shutil.which("etcd")
    if binary is None:
        raise RuntimeError("etcd binary not found on PATH")
    last: Exception | None = None
    for attempt in range(_START_ATTEMPTS):
        server = TlsEtcdServer(workdir / f"try{attempt}", pki=pki, client_cert_auth=client_cert_auth,
                               extra_args=extra_args, client_port=free_port(), peer_port=free_port(), binary=binary)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
            server.kill()
    raise RuntimeError(f"TLS etcd did not start after {_START_ATTEMPTS} attempts: {last}")
