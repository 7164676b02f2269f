"""`moebench bench-scale`: the random real-shape checkpoint it builds, its counts, and a whole run on a tiny model."""

from __future__ import annotations

import subprocess
import sys

import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from moebench.measure.scale import build_random_checkpoint, layer_figures, real_config
from moebench.moe.layered import LayeredCheckpoint


def test_built_checkpoint_loads_in_plain_transformers_with_every_tensor(tmp_path):
    config = tiny_config("qwen3_moe")
    config.dtype = "bfloat16"
    written = build_random_checkpoint(str(tmp_path / "m"), config, progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert written["bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    assert experts.dtype == torch.bfloat16 and 0.015 < experts.float().std().item() < 0.025  # random, std 0.02
    LayeredCheckpoint(str(tmp_path / "m"))  # and it opens layer by layer


def test_layer_figures_count_the_real_configs():
    qwen = layer_figures(real_config("Qwen3-30B-A3B"))
    assert qwen["layers"] == 48
    # 128 experts x (gate, up, down) 2048 x 768 each: 604M parameters per layer's experts, bfloat16
    assert 128 * 3 * 2048 * 768 * 2 < qwen["largest_layer"] < 1.05 * 128 * 3 * 2048 * 768 * 2
    assert 2.5e9 < qwen["active_per_token"] < 3.5e9  # "A3B": about 3B active (the embeddings excluded)
    mixtral = layer_figures(real_config("Mixtral-8x7B"))
    assert 40e9 < mixtral["total_bytes"] / 2 < 48e9  # 46.7B parameters


def test_bench_scale_runs_on_a_given_model_and_prints_every_figure(saved_models, tmp_path):
    done = subprocess.run([sys.executable, "-m", "moebench.cli", "bench-scale", "--model", saved_models("qwen3_moe"),
                           "--samples", "2", "--seq-len", "16", "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for figure in ("peak RSS", "x the largest layer", "% of the model", "plain forward", "cheap statistics",
                   "outputs", "Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V3"):
        assert figure in out, figure
    assert not (tmp_path / "w").exists()  # the bench removes what it builds
