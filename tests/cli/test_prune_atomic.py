"""`moebench prune --out DIR` is all or nothing: a real kill -9 mid-save or a full disk leaves no
partial DIR, and the next run cleans the leftover and succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import build_tokenizer, fill_disk
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from moebench.cli import main


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A 2-layer Mixtral with 50 MB of experts: saving its pruned half takes long enough to be killed."""
    folder = tmp_path_factory.mktemp("wide")
    tiny_model("mixtral", hidden_size=128, intermediate_size=2048).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_kill_9_while_saving_leaves_no_partial_folder_and_the_retry_cleans_up(wide_model, tmp_path):
    out = tmp_path / "pruned"
    cmd = [sys.executable, "-m", "moebench.cli", "prune", wide_model, "--method", "weight_norm", "--ratio", "0.5",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f".pruned.partial-{proc.pid}"
    deadline = time.time() + 300
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    assert partial.exists(), "the prune finished before its temporary folder was seen"
    proc.send_signal(signal.SIGKILL)  # mid-save: the checkpoint is being written into the sibling
    proc.wait()
    assert not out.exists() and partial.exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"removed {partial}, left by an interrupted run" in done.stdout
    assert not partial.exists() and {"config.json", "plan.json", "tokenizer.json"} <= set(os.listdir(out))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4


def test_full_disk_names_the_folder_and_leaves_nothing(saved_models, small_disk, capsys):
    fill_disk(small_disk, leave=64 * 1024)  # the tiny model's weights need about 400 KB
    out = small_disk / "pruned"
    assert main(["prune", saved_models("mixtral"), "--method", "weight_norm", "--ratio", "0.25",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"no space left on the device holding {small_disk} while writing pruned" in err
    assert os.listdir(small_disk) == ["filler"]
    os.remove(small_disk / "filler")
    assert main(["prune", saved_models("mixtral"), "--method", "weight_norm", "--ratio", "0.25",
                 "--out", str(out)]) == 0
    assert "plan.json" in os.listdir(out)


def test_existing_folders_are_refused_before_any_work(saved_models, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["prune", str(tmp_path / "no-model"), "--method", "weight_norm", "--ratio", "0.25",
                 "--out", str(taken)]) == 2
    assert f"{taken} exists and is not empty" in capsys.readouterr().err  # before the model is looked for
    (taken / "notes.txt").unlink()
    assert main(["prune", saved_models("mixtral"), "--method", "weight_norm", "--ratio", "0.25",
                 "--out", str(taken)]) == 0  # an empty folder is fine
    assert main(["prune", saved_models("mixtral"), "--method", "weight_norm", "--ratio", "0.25",
                 "--out", str(taken)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
