"""Structured entries to the systemd journal through the host's own libsystemd (`sd_journal_sendv`).

Why ctypes and not a Python binding: systemd-python is published only as source, so installing it meant
compiling against libsystemd-dev with gcc, and installing those upgraded the host's systemd packages (8 on a
fresh Debian 12: issue 19); cysystemd's wheels carry a private copy of libsystemd that the distribution's
security updates never reach. `libsystemd.so.0` is on every systemd host (Debian: libsystemd0, which the
package depends on) and `sd_journal_sendv` is its stable, documented call: one array of `FIELD=value`
entries, each of which may hold newlines and any bytes. Nothing is compiled, for any Python version.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Mapping

LIBRARY = "libsystemd.so.0"
# journald's rule for a field a client may set: upper case letters, digits and '_', not starting with '_'
# or a digit, at most 64 characters; it drops any other field without a word.
FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class JournalSender:
    """Sends one entry per call; not connected to anything until the first call (libsystemd opens its
    datagram socket to /run/systemd/journal/socket itself, once)."""

    def __init__(self, library: str = LIBRARY) -> None:
        lib = ctypes.CDLL(library, use_errno=True)
        self._sendv = lib.sd_journal_sendv
        self._sendv.argtypes = [ctypes.POINTER(_IOVec), ctypes.c_int]
        self._sendv.restype = ctypes.c_int

    def send(self, fields: Mapping[str, str]) -> None:
        """Send `fields` (names as FIELD_NAME, values any text) as one entry; OSError when journald refuses it.
        A name journald would drop raises ValueError instead, so a field never disappears unseen."""
        entries = []
        for name, value in fields.items():
            if not FIELD_NAME.fullmatch(name):
                raise ValueError(f"not a journal field name: {name!r}")
            entries.append(f"{name}={value}".encode("utf-8", "replace"))
        # The bytes objects stay referenced by `entries` for the call: the iovec points into them.
        iov = (_IOVec * len(entries))(*(_IOVec(ctypes.cast(ctypes.c_char_p(e), ctypes.c_void_p), len(e))
                                        for e in entries))
        result = self._sendv(iov, len(entries))
        if result < 0:
            raise OSError(-result, os.strerror(-result))
