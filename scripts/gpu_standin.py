#!/usr/bin/env python3
"""A stand-in for vLLM, for scripts/gpu_check.py: no model, only what vLLM does to the GPUs.

Run as the process back-end runs an engine (`<prefix> engine run <instance>`, in its own session):

    gpu_standin.py RUN_DIR engine run INSTANCE

it reads the spec the agent wrote (RUN_DIR/engines/INSTANCE.json), turns it into the `vllm serve` argv and
environment exactly as the engine supervisor does (nebula.core.engine_spec.vllm_command), records them in
RUN_DIR/INSTANCE.command.json, and starts in their environment (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER) a
worker that takes the replica's share (--gpu-memory-utilization) of every GPU it sees with torch, as vLLM's
workers do, and records what it saw in RUN_DIR/INSTANCE.worker.json. SIGTERM stops both, like a drain.
With NEBULA_GPU_CHECK_FAKE_ALLOC=<bytes per GPU> the worker allocates nothing, needs no torch, and reports
GPU-fake-<index> for each pinned GPU (tests/unit/test_gpu_check.py, on a machine without GPUs).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONTEXT_MIB = 512
"""Left out of the allocation: what a CUDA context itself takes, so the process holds about its share."""
MIB = 2**20


def allocation_bytes(share: float, total_bytes: int) -> int:
    """What the worker allocates on a GPU of `total_bytes` for a share (0: vLLM's default, 0.9)."""
    return max(0, int((share or 0.9) * total_bytes) - CONTEXT_MIB * MIB)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def leader(run_dir: Path, instance: str) -> int:
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # the source tree, when nebula is not on the path
    from nebula.core.config import EngineConfig
    from nebula.core.engine_spec import EngineSpec, vllm_command

    spec = EngineSpec.from_dict(json.loads((run_dir / "engines" / f"{instance}.json").read_text()))
    argv, env = vllm_command(spec, EngineConfig(), cpu=False)
    write_json(run_dir / f"{instance}.command.json", {"argv": argv, "env": env, "pid": os.getpid(),
                                                      "sid": os.getsid(0)})
    share = spec.gpu_memory_utilization
    worker = subprocess.Popen([sys.executable, __file__, "--allocate", str(share),
                               str(run_dir / f"{instance}.worker.json")], env={**os.environ, **env})

    def stop(_sig: int, _frame: object) -> None:
        worker.terminate()

    signal.signal(signal.SIGTERM, stop)
    return worker.wait()


def allocate(share: float, out: Path) -> int:
    stopping = []
    signal.signal(signal.SIGTERM, lambda _s, _f: stopping.append(True))
    devices: list[dict[str, Any]] = []
    blocks = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    fake_total = int(os.environ.get("NEBULA_GPU_CHECK_FAKE_ALLOC", "0") or 0)
    if fake_total:
        devices = [{"uuid": f"GPU-fake-{i}", "total_bytes": fake_total,
                    "allocated_bytes": allocation_bytes(share, fake_total)} for i in visible.split(",") if visible]
    else:
        torch: Any = importlib.import_module("torch")
        for d in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(d)
            nbytes = allocation_bytes(share, int(props.total_memory))
            blocks.append(torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{d}").zero_())
            uuid = str(getattr(props, "uuid", ""))
            devices.append({"uuid": uuid if uuid.startswith("GPU-") or not uuid else f"GPU-{uuid}",
                            "total_bytes": int(props.total_memory), "allocated_bytes": nbytes})
        torch.cuda.synchronize()
    write_json(out, {"pid": os.getpid(), "sid": os.getsid(0), "visible": visible,
                     "order": os.environ.get("CUDA_DEVICE_ORDER", ""), "devices": devices})
    while not stopping:
        time.sleep(0.1)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--allocate":
        return allocate(float(argv[1]), Path(argv[2]))
    if len(argv) == 4 and argv[1:3] == ["engine", "run"]:
        return leader(Path(argv[0]), argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
