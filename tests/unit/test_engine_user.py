"""Engines run as a user of their own, which cannot read the control plane's credentials. Under systemd that is
the unit's User= (tests/integration/test_systemd_units.py proves it in a real systemd); here, the process
back-end: an agent running as root starts each engine as engine.user, with no supplementary groups and none
of the agent's secrets in its environment, and the spec files it writes stay readable whatever its umask."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nebula.adapters.processes import ProcessEngineUnits, engine_env
from nebula.core.engine_spec import EngineSpec
from nebula.errors import PermanentError
from nebula.services.agent.specfiles import SpecFiles

# What the "engine" does: who it is, whether it can read the secret, what of the agent's env it got.
SPY = ('id -un; id -G; cat "$SECRET" 2>&1 || true; env | grep -c -e ETCD_PASSWORD -e HF_TOKEN; '
       'echo HOME=$HOME; echo done')


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory any user may enter (pytest's tmp_path is root's alone, which would prove nothing)."""
    d = Path(tempfile.mkdtemp(prefix="nebula-engine-user-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


async def run_spy(units: ProcessEngineUnits, log: Path) -> str:
    await units.start("spy")
    for _ in range(100):
        if "done" in (text := _text(log)):
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"the spy never finished: {_text(log)}")


async def test_a_root_agent_starts_engines_as_engine_user_without_its_secrets(shared: Path) -> None:
    # Not a skip: the suite runs as root (scripts/test.sh installs packages), and a check that quietly did
    # not run would hide the one thing this test is for.
    assert os.geteuid() == 0, "run the tests as root (scripts/test.sh): only root can start a process as another user"
    secret = shared / "etcd-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o640)  # root:root, as a control-plane credential would be root:nebula
    env = {"PATH": "/usr/bin:/bin", "SECRET": str(secret), "NEBULA_CLUSTER_ETCD_PASSWORD": "s3cret",
           "HF_TOKEN": "hf_x"}
    units = ProcessEngineUnits(["/bin/sh", "-c", SPY], shared / "run", shared / "logs", env, user="nobody",
                               home=shared / "engine-home")
    out = (await run_spy(units, shared / "logs" / "spy.log")).splitlines()
    assert out[0] == "nobody" and out[1].split() == [str(grp.getgrnam("nogroup").gr_gid)]
    assert "Permission denied" in out[2] and "s3cret" not in "\n".join(out)
    assert out[3] == "0" and out[4] == f"HOME={shared / 'engine-home'}"
    assert (shared / "engine-home").stat().st_uid == pwd.getpwnam("nobody").pw_uid


async def test_a_missing_engine_user_is_a_clear_permanent_error(shared: Path) -> None:
    units = ProcessEngineUnits(["/bin/true"], shared / "run", shared / "logs", {}, user="no-such-user-here")
    with pytest.raises(PermanentError, match=r"engine\.user 'no-such-user-here' does not exist.*user = \"\""):
        await units.start("spy")


def test_engines_never_see_the_agent_s_secrets_in_their_environment() -> None:
    env = {"PATH": "/bin", "NEBULA_CLUSTER_ETCD_PASSWORD": "x", "NEBULA_CLUSTER_ETCD_USER": "u",
           "NEBULA_ADMIN_KEY": "k", "HF_TOKEN": "t", "MODELSCOPE_API_TOKEN": "m", "NEBULA_ENGINE_VLLM_VENV": "/v"}
    assert engine_env(env) == {"PATH": "/bin", "NEBULA_ENGINE_VLLM_VENV": "/v"}


def test_spec_files_are_readable_by_the_engine_user_whatever_the_agent_s_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        files = SpecFiles(str(tmp_path / "run"))
        files.write(EngineSpec(instance="m", model="m", source="/models/m", port=18000))
    finally:
        os.umask(old)
    assert stat.S_IMODE(files.dir.stat().st_mode) == 0o755
    assert stat.S_IMODE(files.path("m").stat().st_mode) == 0o644
