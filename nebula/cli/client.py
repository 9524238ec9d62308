"""The CLI's client of the gateway's admin API (blocking: the CLI does one thing and exits)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nebula.core.config import NebulaConfig

ADMIN_KEY_FILE = "/etc/nebula/admin.key"

# Exit codes of every `nebula` command (also in `nebula --help` and the README).
EXIT_OK = 0
EXIT_FAILURE = 1      # refused or failed: conflict, server error, a model failed, an unhealthy status
EXIT_USAGE = 2        # bad arguments, config or input (argparse, ConfigError, HTTP 400)
EXIT_NOT_FOUND = 3    # no such model, node or log (HTTP 404)
EXIT_TIMEOUT = 4      # --wait ran out before the model was ready
EXIT_UNREACHABLE = 5  # the gateway or etcd did not answer (HTTP 503: the gateway cannot reach etcd)

EXIT_CODES_HELP = """exit codes:
  0  ok
  1  failed: refused (conflict, permission), server error, a model failed to load, status unhealthy
  2  usage: bad arguments, config or input
  3  not found: no such model, node or logs
  4  timeout: --wait ran out before the model was ready
  5  unreachable: the gateway or etcd did not answer"""


class CliError(Exception):
    """One line for the operator, with the fix when there is one; exit code attached."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def http_exit_code(status: int) -> int:
    if status in (400, 413, 422):
        return EXIT_USAGE
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 503:
        return EXIT_UNREACHABLE
    return EXIT_FAILURE


def gateway_url(cfg: NebulaConfig, env: Mapping[str, str]) -> str:
    if env.get("NEBULA_URL"):
        return env["NEBULA_URL"].rstrip("/")
    host = "127.0.0.1" if cfg.gateway.host in ("0.0.0.0", "::", "") else cfg.gateway.host
    # A self-signed gateway certificate: trust it with SSL_CERT_FILE=/path/ca.pem (docs/security.md).
    scheme = "https" if cfg.gateway.tls_cert_file else "http"
    return f"{scheme}://{host}:{cfg.gateway.port}"


def admin_key(env: Mapping[str, str], key_file: str = ADMIN_KEY_FILE) -> str | None:
    """NEBULA_ADMIN_KEY, else the file NEBULA_ADMIN_KEY_FILE names, else `key_file` (gateway.admin_key_file)."""
    if env.get("NEBULA_ADMIN_KEY"):
        return env["NEBULA_ADMIN_KEY"]
    path = Path(env.get("NEBULA_ADMIN_KEY_FILE") or key_file)
    if not str(path) or str(path) == ".":
        return None
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects with every header of the request, Authorization included, to whatever host the
    answer names: the admin key would go to another origin. Nebula's API never redirects, so none is followed
    (the 3xx then arrives as an HTTPError)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        return None


class AdminClient:
    def __init__(self, base_url: str, key: str | None, timeout_s: float = 30.0) -> None:
        self.base = base_url
        self.key = key
        self.timeout = timeout_s
        self._opener = urllib.request.build_opener(_RefuseRedirects())

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                raise CliError(f"the gateway at {self.base} redirected to {e.headers.get('Location', '?')} (HTTP "
                               f"{e.code}); Nebula's API never redirects, so the key was not sent there: point "
                               "NEBULA_URL at the gateway itself", EXIT_USAGE) from None
            raise CliError(_error_message(e), http_exit_code(e.code)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CliError(f"cannot reach the gateway at {self.base} ({reason}); is Nebula up? "
                           "(`nebula up`, or set NEBULA_URL)", EXIT_UNREACHABLE) from None
        return json.loads(raw) if raw else None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        err = json.loads(e.read())["error"]
        msg = str(err.get("message", err))
    except (ValueError, KeyError, TypeError):
        msg = e.reason
    if e.code in (401, 403):
        msg += " (set NEBULA_ADMIN_KEY, or make gateway.admin_key_file, default /etc/nebula/admin.key, readable)"
    return f"{msg} (HTTP {e.code})"
