"""A micro training run of each testbed recipe: a few steps on a tiny config, saved and reloaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moebench.testbed.recipes import RECIPES

MICRO = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.mark.parametrize("name", list(RECIPES))
def test_micro_training_run(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moebench.testbed.train import train

    summary = train(name, tmp_path, steps=4, threads=1, overrides=MICRO, log_every=0)
    assert summary["steps"] == 4 and summary["final_loss"] > 0
    assert json.loads((tmp_path / "training.json").read_text()) == summary
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.dtype == torch.float32  # stored in fp16, computed in fp32
    assert not model.config.output_router_logits
    ids = tok("12 + 34 =", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_training_is_deterministic():
    from moebench.testbed.tokenizer import train_tokenizer
    from moebench.testbed.train import batches, build_model

    tok = train_tokenizer(n_items=2000)
    first, again = next(batches(tok, 2, 64, seed=0)), next(batches(tok, 2, 64, seed=0))
    assert torch.equal(first, again)
    a, b = (build_model(RECIPES["testbed-8e"], len(tok), MICRO) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_train_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moebench.cli", "zoo", "train", "testbed-8e", "--steps", "2",
                          "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
