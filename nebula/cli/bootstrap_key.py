"""The bootstrap admin key, as `nebula up` (and through it scripts/quickstart.sh) makes it: the same two files
the Debian package's postinst writes (docs/security.md), at the paths the config names.

- `gateway.admin_key_file` (default /etc/nebula/admin.key): the token, 0600, the owner's (root's) only; the
  CLI sends it by default.
- `gateway.admin_key_digest_file` (default /etc/nebula/admin.key.sha256): its SHA-256, 0640 and group
  `nebula` where that group exists, which is all the gateway (User=nebula) reads.

Never replaced, and the operator is never locked out: a key without its digest file gets the digest again;
a digest file without its key is left alone (its key is elsewhere, and only its owner knows it).
"""

from __future__ import annotations

import grp
import hashlib
import os
import secrets
from pathlib import Path

from nebula.cli.client import EXIT_FAILURE, CliError
from nebula.core.config import GatewayConfig

GATEWAY_GROUP = "nebula"


def new_token() -> str:
    """256 random bits, as `nebula keys create` and the package make them."""
    return "nbk_" + secrets.token_urlsafe(32)


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write `text` to a new file at `path` with `mode`, atomically (a reader never sees half a key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, mode)  # the umask must not widen or narrow it
        if os.geteuid() == 0 and mode & 0o040:
            try:
                os.fchown(fd, 0, grp.getgrnam(GATEWAY_GROUP).gr_gid)
            except KeyError:
                pass  # no nebula group (a machine without the units): root's group, as created
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_admin_key(cfg: GatewayConfig) -> str | None:
    """Make the bootstrap admin key where none exists; a line telling what was done, or None for nothing.

    Raises CliError when the files cannot be written (e.g. not root for /etc/nebula): starting a gateway
    without the key the operator counts on would leave it open.
    """
    if not cfg.admin_key_file or not cfg.admin_key_digest_file:
        return None  # the operator turned the bootstrap key off
    key, digest = Path(cfg.admin_key_file), Path(cfg.admin_key_digest_file)
    try:
        if digest.exists():
            return None
        if key.exists():
            token = key.read_text().strip()
            done = f"wrote the digest of the admin key {key} to {digest}"
        else:
            token = new_token()
            # The key first: should the digest then fail, the next run writes it from the key.
            _write_new(key, token + "\n", 0o600)
            done = f"created the bootstrap admin key {key} (the CLI sends it; digest in {digest})"
        _write_new(digest, hashlib.sha256(token.encode()).hexdigest() + "\n", 0o640)
    except OSError as e:
        raise CliError(f"cannot create the bootstrap admin key ({e.filename or key}: {e.strerror}); run as root, or "
                       "point gateway.admin_key_file and gateway.admin_key_digest_file somewhere writable",
                       EXIT_FAILURE) from None
    return done
