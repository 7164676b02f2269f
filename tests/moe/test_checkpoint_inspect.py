"""Non-uniform checkpoints round-trip through moebench; `moebench inspect` on every family."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from tiny_models import sample_ids, tiny_model
from transformers import AutoModelForCausalLM

from moebench.cli import main
from moebench.moe.checkpoint import NonUniformCheckpointWarning, load_model, save_pruned
from moebench.moe.ops import prune
from moebench.moe.view import MoEView


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_non_uniform_round_trip(family, tmp_path):
    model = tiny_model(family)
    first, second = MoEView(model).indices[:2]
    prune(model, {first: [0, 1, 3, 5, 6, 7], second: [0, 3, 4, 7]})
    with torch.no_grad():
        expected = model(sample_ids()).logits
    with pytest.warns(NonUniformCheckpointWarning, match="plain transformers cannot load"):
        save_pruned(model, tmp_path)
    loaded = load_model(str(tmp_path))
    assert MoEView(loaded).experts_per_layer == {first: 6, second: 4}
    with torch.no_grad():
        assert torch.equal(loaded(sample_ids()).logits, expected)
    with pytest.raises(RuntimeError):  # one expert count per config: plain transformers cannot build it
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_uniform_save_is_a_plain_checkpoint(tmp_path):
    model = tiny_model("qwen3_moe")
    prune(model, {i: [0, 2, 4, 6] for i in MoEView(model).indices})
    save_pruned(model, tmp_path)
    loaded = load_model(str(tmp_path))
    assert set(MoEView(loaded).experts_per_layer.values()) == {4}


def test_inspect_prints_structure(family, saved_models, capsys):
    assert main(["inspect", saved_models(family)]) == 0
    out = capsys.readouterr().out
    view = MoEView(tiny_model(family))
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines()[1:])
    assert rows["family"].startswith(view.family.name)
    assert rows["routed experts"] == "8 per layer"
    assert rows["top_k"] == str(view.top_k)
    assert "% )" not in rows["expert bytes"] and rows["format on disk"] == "float32"
    assert rows["checkpoint bytes"].endswith("MB on disk")


def test_inspect_cli_errors_cleanly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "moebench.cli", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "moebench inspect: error" in done.stderr
