"""scripts/bench_request_path.py, briefly: the in-process measure of the gateway's Python per request must keep
running against the real app (a changed constructor or port would otherwise break it unseen), and it must stop
rather than time requests the gateway refused. The figures themselves are not judged (a timed test is noise)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_request_path.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_it_times_whole_and_streamed_answers_through_the_real_gateway() -> None:
    proc = _run("--n", "40", "--tokens", "4", "--profile")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = dict(re.findall(r"^(non-streamed|streamed) request.*: ([0-9.]+) us", proc.stdout, re.M))
    assert set(figures) == {"non-streamed", "streamed"}, proc.stdout
    assert all(float(us) > 0 for us in figures.values()), figures
    # The profile is printed. (That the data-plane server answered, never aiohttp, the script checks itself: a
    # hand-over stops it. Which functions the profile names depends on which modules run compiled, where
    # cProfile sees none of their functions.)
    assert re.search(r"^\s*\d+ function calls", proc.stdout, re.M) and "tottime" in proc.stdout, proc.stdout[-2000:]


def test_it_times_the_path_from_evicted_caches() -> None:
    proc = _run("--n", "20", "--only", "whole", "--evict-mb", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.fullmatch(r"non-streamed request: -?[0-9.]+ us of the gateway's Python, caches evicted "
                        r"\(1 MiB copied before each, the copy's own time taken off\)\n", proc.stdout), proc.stdout


def test_it_stops_when_the_gateway_refuses_the_requests() -> None:
    proc = _run("--n", "5", "--key", "not-the-key")
    assert proc.returncode != 0
    assert "HTTP/1.1 401" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_it_stops_when_a_request_is_handed_to_aiohttp() -> None:
    # What it times must be the data-plane server's path: a request that server hands over (here one with an
    # Upgrade header, which it leaves to aiohttp) stops the run rather than being timed.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        sys.argv = ["bench_request_path.py", "--n", "5", "--only", "whole"]
        import bench_request_path as bench
        plain = bench.request
        bench.request = lambda stream, key=bench.KEY: plain(stream, key).replace(
            b"HTTP/1.1\\r\\n", b"HTTP/1.1\\r\\nUpgrade: h2c\\r\\n", 1)
        bench.main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "handed the request to HandedOver" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
