"""A device this machine lacks is named, with the fix, before anything is loaded or written."""

from __future__ import annotations

import os

import pytest
import torch

from moebench.cli import main
from moebench.moe.checkpoint import check_device

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def test_check_device_names_the_value_and_the_fix():
    assert check_device("cpu") == "cpu" and check_device(None) == "cpu"
    with pytest.raises(ValueError, match=r"--device 'cuda:1': CUDA is not available on this machine .* --device cpu"):
        check_device("cuda:1")
    with pytest.raises(ValueError, match=r"--device 'gpu0' is not a device torch knows .* cpu, cuda or cuda:N"):
        check_device("gpu0")


@pytest.mark.parametrize("command", ["prune", "calibrate"])
def test_cli_refuses_cuda_without_a_gpu_before_loading(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = [command, "testbed-8e", "--calib", "testbed:mix", "--device", "cuda"]
    args += ["--method", "frequency", "--ratio", "0.5", "--out", str(out)] if command == "prune" else []
    assert main(args) == 2
    assert "--device 'cuda': CUDA is not available on this machine" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing calibrated or written


def test_lm_eval_refuses_device_cuda_before_writing_a_pruned_checkpoint(tmp_path, monkeypatch):
    from moebench.eval.model import PrunedMoELM

    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"device=cuda: CUDA is not available on this machine .* device=cpu"):
        PrunedMoELM(pretrained="testbed-8e", method="frequency", ratio=0.5, calib="testbed:mix", sequential="true",
                    device="cuda", stats_dir=str(tmp_path / "cache" / "stats"))
    assert not os.path.exists(tmp_path / "cache")
