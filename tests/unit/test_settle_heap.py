"""runtime.settle_heap, run in a process of its own as a service's main runs it: what start-up built is frozen
(no collection walks it again), and cyclic garbage made afterwards is still collected without being asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import gc, weakref
from nebula.services.gateway.app import build_gateway_app  # start-up's imports: what a gateway holds for life
from nebula.services.runtime import YOUNG_GC_THRESHOLD, settle_heap

class Node:
    pass

settle_heap()
print("frozen", gc.get_freeze_count())
print("threshold", gc.get_threshold()[0] == YOUNG_GC_THRESHOLD)
first = Node()
first.me = first  # a cycle: only the collector can free it
ref = weakref.ref(first)
del first
for _ in range(3 * YOUNG_GC_THRESHOLD):
    node = Node()
    node.me = node
print("collected", ref() is None)
"""


def test_a_settled_heap_is_frozen_and_new_cycles_are_still_collected() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split("\n")
    frozen = int(out[0].split()[1])
    assert frozen > 20_000, out  # the app's modules, at the least
    assert out[1:3] == ["threshold True", "collected True"], out
