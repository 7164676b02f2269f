"""A real single-node Slurm cluster for the tests (scripts/slurm/*.sh).

The session fixture installs slurm-wlm and munge where they are missing (as root, with apt),
starts the cluster and stops it at the end of the session when it started it. It skips only
where Slurm truly cannot be had (not root, no apt-get, packages unavailable); set
MOEBENCH_REQUIRE_SLURM=1 to make that a failure instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "slurm"
SBIN_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"


def _unavailable(reason: str):
    if os.environ.get("MOEBENCH_REQUIRE_SLURM") == "1":
        pytest.fail(f"Slurm required (MOEBENCH_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(reason)


def _run(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script)], capture_output=True, text=True,
                          env=env, timeout=600)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields the SLURM_CONF path of a running single-node cluster (partition "debug")."""
    env = dict(os.environ, PATH=SBIN_PATH)
    if not shutil.which("slurmctld", path=SBIN_PATH) or not shutil.which("munged", path=SBIN_PATH):
        if os.geteuid() != 0:
            _unavailable("Slurm is not installed and this is not root: cannot install slurm-wlm and munge")
        if not shutil.which("apt-get", path=SBIN_PATH):
            _unavailable("Slurm is not installed and apt-get is not available to install slurm-wlm and munge")
        out = _run("install.sh", env)
        if out.returncode != 0:
            _unavailable(f"installing slurm-wlm and munge failed: {_last_line(out.stderr or out.stdout)}")

    # Was the cluster already up? Then it is someone else's to stop.
    ping = subprocess.run(["bash", "-c", f". '{SCRIPTS / 'common.sh'}' && controller_up"], env=env,
                          capture_output=True, text=True)
    already_up = ping.returncode == 0
    if os.geteuid() != 0 and not already_up:
        _unavailable("Slurm is installed but not running, and starting the test cluster needs root")
    out = _run("start.sh", env)
    if out.returncode != 0:
        pytest.fail(f"starting the single-node Slurm cluster failed:\n{out.stdout}\n{out.stderr}")
    match = re.search(r"SLURM_CONF=(\S+)", out.stdout)
    assert match, out.stdout
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ.update(SLURM_CONF=match.group(1), PATH=SBIN_PATH)
    try:
        yield match.group(1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not already_up:
            out = _run("stop.sh", env)
            assert out.returncode == 0, out.stderr
