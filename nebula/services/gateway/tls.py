"""HTTPS for the gateway when [gateway] tls_cert_file and tls_key_file are set."""

from __future__ import annotations

import ssl

from nebula.core.config import GatewayConfig
from nebula.errors import ConfigError


def server_ssl_context(cfg: GatewayConfig) -> ssl.SSLContext | None:
    """A server context with the configured certificate chain and key (TLS 1.2 and up); None for plain HTTP.

    Read once at start: a renewed certificate takes a gateway restart. Unreadable or mismatched files stop
    the start with a message naming them, rather than serving plain HTTP the operator did not ask for.
    """
    if not cfg.tls_cert_file:
        return None
    where = "gateway.tls_cert_file"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except ssl.SSLError as e:  # before OSError: it is one
        raise ConfigError(where, f"{where}: {cfg.tls_cert_file} and {cfg.tls_key_file} are not a PEM certificate "
                          f"chain and its private key ({e.reason or e})") from None
    except OSError as e:
        raise ConfigError(where, f"{where}: cannot read {e.filename or cfg.tls_cert_file}: {e.strerror or e}") from None
    return ctx
