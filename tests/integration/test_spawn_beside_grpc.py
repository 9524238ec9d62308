"""Engines are spawned by a process whose etcd client (gRPC) is busy: no spawn may die before it execs.

gRPC's fork handlers, half on in the Python package, crashed about half of such spawns with SIGSEGV on this
kind of machine (163 of 300) and once aborted the parent; the quickstart's third engine died that way
(`engine exited (signal:11)`). `nebula.cli.main.prepare_process` turns them off before gRPC loads. This test
runs what the agent does (a busy etcd client, engines spawned through the process back-end's own spawn) in a
fresh interpreter set up as every nebula command sets itself up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.harness.etcd import EtcdServer

pytestmark = pytest.mark.etcd

SPAWNS = 200

CHILD = textwrap.dedent('''
    import asyncio, os, sys, tempfile
    from pathlib import Path
    from nebula.cli.main import prepare_process
    prepare_process(os.environ)
    from nebula.adapters.etcd import EtcdStore
    from nebula.adapters.processes import _spawn, _User

    async def main() -> None:
        store = await EtcdStore.connect([sys.argv[1]])
        busy = True

        async def hammer(i: int) -> None:
            n = 0
            while busy:
                await store.put(f"/spawn-test/{i}", str(n).encode())
                n += 1

        tasks = [asyncio.create_task(hammer(i)) for i in range(4)]
        await asyncio.sleep(0.5)
        log = Path(tempfile.mkdtemp()) / "spawn.log"
        # As an engine user (the agent's default as root): Popen must fork then (it cannot vfork to change user).
        user = _User(os.getuid(), os.getgid(), tempfile.gettempdir())
        died = []
        for _ in range(int(sys.argv[2])):
            child = await asyncio.to_thread(_spawn, ["/bin/true"], log, dict(os.environ), user)
            rc = await asyncio.to_thread(child.wait)
            if rc != 0:
                died.append(rc)
        busy = False
        await asyncio.gather(*tasks)
        print("died", len(died), sorted(set(died)))
        await store.close()

    asyncio.run(main())
''')


def test_spawns_beside_a_busy_etcd_client_all_reach_exec(etcd_server: EtcdServer) -> None:
    out = subprocess.run([sys.executable, "-c", CHILD, etcd_server.endpoints[0], str(SPAWNS)], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, f"the spawning process itself failed:\n{out.stdout}\n{out.stderr[-3000:]}"
    assert "died 0 []" in out.stdout, f"spawns died before exec: {out.stdout}\n{out.stderr[-2000:]}"
    assert "skipping fork() handlers" not in out.stderr, "gRPC's fork handlers ran"
