"""Streaming prune to disk: a checkpoint written one decoder layer at a time equals in-memory prune + save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tiny_models import sample_ids, tiny_model
from transformers import AutoModelForCausalLM

from moebench.moe.checkpoint import load_model
from moebench.moe.formats import save_sliced
from moebench.moe.layered import LayeredCheckpoint
from moebench.moe.ops import prune
from moebench.moe.streaming import save_streaming
from moebench.moe.view import MoEView


def keys_of(folder: str) -> set[str]:
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    keys = set()
    for shard in set(index["weight_map"].values()):
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            keys |= set(f.keys())
    assert keys == set(index["weight_map"])
    return keys


def saved_keys(folder: str) -> set[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_streamed_checkpoint_equals_in_memory_prune(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "source")
    keep = {i: [0, 1, 3, 5, 6, 7] for i in MoEView(model).indices}
    skeleton = LayeredCheckpoint(str(tmp_path / "source"))
    prune(skeleton.model, keep)  # the plan applied to the meta skeleton gives the pruned config
    save_streaming(LayeredCheckpoint(str(tmp_path / "source")), keep, str(tmp_path / "streamed"), skeleton.model.config)
    prune(model, keep)
    model.save_pretrained(tmp_path / "in-memory")
    assert keys_of(str(tmp_path / "streamed")) == saved_keys(str(tmp_path / "in-memory"))  # as transformers names them
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(sample_ids()).logits, model(sample_ids()).logits)


def test_sliced_checkpoint_equals_in_memory_prune(family, tmp_path):
    """`save_sliced` (the source's own tensors, experts and router rows sliced: what `moebench prune` writes for a
    uniform budget) names and sizes every tensor as transformers saves the model pruned in memory."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "source")
    keep = {i: [0, 1, 3, 5, 6, 7] for i in MoEView(model).indices}
    counts = MoEView(model).experts_per_layer
    skeleton = LayeredCheckpoint(str(tmp_path / "source"))
    prune(skeleton.model, keep)
    written = save_sliced(str(tmp_path / "source"), skeleton.model, keep, counts, str(tmp_path / "sliced"))
    assert written["format"] == "float32"
    prune(model, keep)
    model.save_pretrained(tmp_path / "in-memory")
    assert keys_of(str(tmp_path / "sliced")) == saved_keys(str(tmp_path / "in-memory"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(sample_ids()).logits, model(sample_ids()).logits)


def run(*args, env):
    return subprocess.run([sys.executable, "-m", "moebench.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_prune_sequential_cli_equals_prune(tmp_path):
    """`moebench prune --sequential` (calibration and writing one layer at a time) gives the same plan and
    logits as `moebench prune`, for a pruning and a merging method."""
    env = {**os.environ, "MOEBENCH_CACHE": str(tmp_path / "cache")}
    common = ["--calib", "testbed:mix", "--samples", "8", "--seq-len", "64"]
    for method in ("reap", "hc_smoe", "naee"):  # naee runs the routers: read from the shards for the planning
        outs, logs = {}, {}
        for mode in ("--sequential", "--no-sequential"):
            out = str(tmp_path / f"{method}{mode}")
            done = run("prune", "testbed-8e", "--method", method, "--ratio", "0.5", *common, mode, "--out", out,
                       env=env)
            assert done.returncode == 0, done.stderr[-2000:]
            outs[mode], logs[mode] = out, done.stderr
        assert "sequential calibration: done" in logs["--sequential"]
        assert "calibration" not in logs["--no-sequential"]  # one cache entry: the statistics were found
        plans = [json.loads((Path(o) / "plan.json").read_text())["keep"] for o in outs.values()]
        assert plans[0] == plans[1]
        models = [load_model(o) for o in outs.values()]  # hc_smoe's default: the compact layout, moebench's
        ids = sample_ids(batch=2, length=16)
        with torch.no_grad():
            assert torch.equal(models[0](ids).logits, models[1](ids).logits), method


def test_a_router_on_the_meta_device_is_never_run(tmp_path):
    """torch answers F.linear(cpu input, meta weight) with uninitialised memory: route() must refuse instead."""
    import pytest

    from moebench.moe.view import MoEError

    tiny_model("mixtral").save_pretrained(tmp_path / "source")
    skeleton = LayeredCheckpoint(str(tmp_path / "source"))
    layer = MoEView(skeleton.model).layers[0]
    with pytest.raises(MoEError, match="router's weights are not loaded"):
        layer.route(torch.zeros(3, 32))
    with skeleton.routers() as layers:  # what a planner that runs routers gets: the real router weights
        real = MoEView(AutoModelForCausalLM.from_pretrained(tmp_path / "source")).layers[0]
        assert torch.equal(layers[0].route(torch.ones(3, 32)).indices, real.route(torch.ones(3, 32)).indices)
        assert all(p.is_meta for p in layers[0].experts.parameters())  # the experts were never kept
    assert all(p.is_meta for p in layer.router.parameters())


def test_a_method_reading_weights_is_refused_under_sequential_with_the_reason(tmp_path):
    env = {**os.environ, "MOEBENCH_CACHE": str(tmp_path / "cache")}
    done = run("prune", "testbed-8e", "--method", "weight_norm", "--ratio", "0.5", "--sequential",
               "--out", str(tmp_path / "out"), env=env)
    assert done.returncode == 2
    assert "reads the expert weights while planning" in done.stderr and "--no-sequential" in done.stderr
    assert not (tmp_path / "out").exists()
    # m_smoe's weight matching reads weights: refused before any calibration (nothing cached)
    done = run("prune", "testbed-8e", "--method", "m_smoe", "--ratio", "0.5", "--param", "align=true", "--calib",
               "testbed:mix", "--samples", "4", "--seq-len", "32", "--sequential", "--out", str(tmp_path / "out"),
               env=env)
    assert done.returncode == 2 and "method m_smoe reads the expert weights" in done.stderr
    assert not (tmp_path / "cache" / "stats").exists() and not (tmp_path / "out").exists()


def test_which_methods_read_weights_follows_their_parameters():
    from moebench.method.registry import get_method

    assert get_method("weight_norm").reads_weights_for({})
    assert not get_method("m_smoe").reads_weights_for({}) and get_method("m_smoe").reads_weights_for({"align": True})
    assert not get_method("reap").reads_weights_for({}) and not get_method("hc_smoe").reads_weights_for({})


def test_lm_eval_sequential_true_refuses_a_weight_reading_method_when_its_arguments_are_read():
    import pytest

    from moebench.eval.args import PrunedMoESettings

    with pytest.raises(ValueError, match=r"method weight_norm reads the expert weights .* sequential=false"):
        PrunedMoESettings.from_args({"method": "weight_norm", "ratio": "0.5", "sequential": "true"}, {})
    PrunedMoESettings.from_args({"method": "weight_norm", "ratio": "0.5"}, {})  # in memory: fine


def test_lm_eval_sequential_merge_holds_only_the_merged_experts(tmp_path):
    """`pruned_moe` with `sequential=true` and a merge that keeps every router row (hc_smoe's default) writes the
    compact layout and loads it with moebench: the model in memory holds the merged experts only, its memory
    figures and log-likelihoods equal the in-memory merge's."""
    from lm_eval.api.instance import Instance

    from moebench.eval.model import PrunedMoELM

    args = {"method": "hc_smoe", "ratio": 0.5, "calib": "testbed:mix", "calib_samples": 8, "calib_seq_len": 64,
            "stats_dir": str(tmp_path / "cache" / "stats"), "device": "cpu"}
    request = [Instance("loglikelihood", {}, ("w5 w6 w7", " w8"), 0), Instance("loglikelihood", {}, ("w1", " w2"), 1)]
    runs = {}
    for sequential in ("false", "true"):
        lm = PrunedMoELM(pretrained="testbed-8e", sequential=sequential, **args)
        scores = lm.loglikelihood(request)
        runs[sequential] = (scores, lm.record, MoEView(lm.model).experts_per_layer)
    (folder,) = (tmp_path / "cache" / "pruned").iterdir()
    assert "moebench_expert_map" in (folder / "config.json").read_text()  # compact, the map in its config
    assert runs["true"][1]["sequential"] == str(folder)
    assert set(runs["true"][2].values()) == set(runs["false"][2].values()) == {4}
    assert runs["true"][1]["expert_bytes"]["after"] == runs["false"][1]["expert_bytes"]["after"]
    assert runs["true"][1]["expert_bytes"]["after"] == runs["true"][1]["expert_bytes"]["before"] // 2
    for (seq_ll, seq_greedy), (mem_ll, mem_greedy) in zip(runs["true"][0], runs["false"][0], strict=True):
        assert abs(seq_ll - mem_ll) < 1e-5 and seq_greedy == mem_greedy
