"""`moebench inspect HUB_ID` without a network: an immediate, useful error; a cached config.json still works."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from moebench.testbed.zoo import model_dir

pytestmark = pytest.mark.slow  # each test runs the command line in a subprocess

BIN = os.path.dirname(sys.executable)
MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"


def inspect(model, tmp_path, **env):
    """``moebench inspect MODEL`` with an empty (or given) hub cache and no offline flag unless given."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    base["HF_HUB_CACHE"] = str(tmp_path / "hub")
    return subprocess.run([os.path.join(BIN, "moebench"), "inspect", model], capture_output=True, text=True,
                          env={**base, **env}, timeout=300)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def assert_fails_fast_with_help(out, why: str):
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr
    assert "Retry" not in err and "Traceback" not in err  # one attempt, no half-minute backoff
    assert MIXTRAL in err and why in err
    assert "only config.json" in err and "HF_HUB_OFFLINE=1" in err and "local folder" in err
    assert f"hf download {MIXTRAL} config.json" in err


@pytest.mark.skipif(hub_reachable(), reason="the Hub is reachable from here: the offline condition is not real")
def test_hub_id_with_no_network_fails_at_once_saying_what_to_do(tmp_path):
    assert_fails_fast_with_help(inspect(MIXTRAL, tmp_path), "cannot be reached")


def test_unreachable_hub_endpoint_fails_at_once(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    out = inspect(MIXTRAL, tmp_path, HF_ENDPOINT=endpoint)
    assert_fails_fast_with_help(out, "cannot be reached")
    assert endpoint in out.stderr


def test_offline_flag_without_a_cached_config_says_so(tmp_path):
    assert_fails_fast_with_help(inspect(MIXTRAL, tmp_path, HF_HUB_OFFLINE="1"), "HF_HUB_OFFLINE is set")


def cache_config(tmp_path, repo_id: str) -> None:
    """Put a config.json into a hub cache the way huggingface_hub lays it out (refs/main -> snapshot)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    shutil.copy(model_dir("testbed-8e") / "config.json", repo / "snapshots" / sha / "config.json")


@pytest.mark.parametrize("offline", [True, False])
def test_a_cached_config_is_inspected_with_or_without_the_offline_flag(tmp_path, offline):
    cache_config(tmp_path, "someorg/tiny-moe")
    env = {"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    out = inspect("someorg/tiny-moe", tmp_path, **env)
    assert out.returncode == 0, out.stderr
    assert "Mixtral (model_type mixtral)" in out.stdout and "8 per layer" in out.stdout


def test_inspect_reads_config_json_alone(tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(model_dir("testbed-8e") / "config.json", folder / "config.json")  # no weights, no tokenizer
    out, full = inspect(str(folder), tmp_path), inspect("testbed-8e", tmp_path)
    assert out.returncode == 0 and full.returncode == 0, out.stderr + full.stderr
    rows = [dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in o.stdout.splitlines()[1:])
            for o in (out, full)]
    structure = [{k: v for k, v in r.items() if k not in ("format on disk", "checkpoint bytes")} for r in rows]
    assert "expert bytes" in structure[0] and structure[0] == structure[1]
    # the format: declared by config.json where no weights are there, read from the files' headers where they are
    assert rows[0]["format on disk"] == "float32 (as config.json declares; weights not read)"
    assert rows[1]["format on disk"] == "float16" and rows[1]["checkpoint bytes"].startswith("7.04 MB on disk")
    assert "checkpoint bytes" not in rows[0]
