"""Synthetic safetensors files for tests: real headers, zero-filled data (the readers never touch the data)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def header(tensors: Mapping[str, tuple[str, Sequence[int]]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a file holding `tensors` (name -> (dtype, shape))."""
    obj: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(obj).encode()
    return len(body).to_bytes(8, "little") + body


def write(path: Path, tensors: Mapping[str, tuple[str, Sequence[int]]], data: bool = True) -> None:
    """A safetensors file; with data=False only the header (a download cut short, or a test of the reader)."""
    head = header(tensors)
    size = sum(math.prod(s) * DTYPE_BYTES[d] for d, s in tensors.values()) if data else 0
    with path.open("wb") as f:
        f.write(head)
        f.truncate(len(head) + size)
