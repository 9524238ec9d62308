"""The GPU engine locks against the package registry (needs the registry, as CI has; no GPU, no install):
scripts/check-engine-locks.py resolves vllm-gpu.in again for each lock's Python (3.11 and 3.13) and finds every
pin's manylinux x86_64 wheel for that CPython by its locked hash in the registry's file lists, without
downloading the wheels (about 4 GB per lock)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "scripts/check-engine-locks.py"


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, timeout=600,
                          check=False)


def test_the_gpu_locks_are_current_and_every_wheel_is_in_the_registry() -> None:
    proc = run_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("vllm-gpu-")]
    assert [s.split(":")[0] for s in summaries] == ["vllm-gpu-py311.lock", "vllm-gpu-py313.lock"], proc.stdout
    for summary, tag in zip(summaries, ("cp311", "cp313"), strict=True):
        assert ", current " in summary and f"wheels for {tag} manylinux x86_64" in summary, summary
        size = re.search(r"download ([\d.]+) GB", summary)
        assert size is not None and 2.0 < float(size.group(1)) < 20.0, summary  # CUDA torch + nvidia wheels
        assert f"torch-2.13.0-{tag}-{tag}-manylinux" in proc.stdout
    assert "vllm-0.32.0-" in proc.stdout


def test_a_wrong_hash_and_a_stale_pin_fail_by_name(tmp_path: Path) -> None:
    text = (REPO / "packaging/engine/vllm-gpu-py311.lock").read_text()
    text = re.sub(r"(?m)^(filelock==4\.3\.2 \\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)",
                  lambda m: re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, m.group(1)), text)
    lock = tmp_path / "vllm-gpu-py311.lock"
    lock.write_text(text)
    # The resolver keeps the lock's pins where it can: an edited .in is what makes a lock stale.
    infile = tmp_path / "vllm-gpu.in"
    infile.write_text("vllm==0.32.0\nidna==3.18\n")
    proc = run_check("--in", str(infile), "--lock", str(lock))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL: ")]
    assert "FAIL: stale lock: idna 3.20 in the lock, 3.18 resolved now" in fails
    assert ("FAIL: filelock==4.3.2: none of its 1 locked hashes is a cp311 manylinux x86_64 wheel" in fails)
    assert ", STALE " in proc.stdout
