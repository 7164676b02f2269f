"""Sequential (one decoder layer at a time) calibration equals the one-forward pass on every family."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import sample_ids

from moebench.calib.cache import LayerStats, get_stats, model_fingerprint
from moebench.calib.sequential import collect_sequential
from moebench.calib.stats import GROUPS, CollectSettings, collect
from moebench.moe.checkpoint import load_model
from moebench.moe.layered import LayeredCheckpoint, LayeredLoadError

TOKENS = sample_ids(batch=5, length=12, seed=3)
SETTINGS = CollectSettings(batch_size=2, subsample_tokens=40, ratio_samples=30)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for index in a:
        assert sorted(a[index]) == sorted(b[index]), index
        for name in a[index]:
            x, y = a[index][name], b[index][name]
            assert x.shape == y.shape and x.dtype == y.dtype, (index, name)
            if x.is_floating_point():
                finite = torch.isfinite(x)
                assert torch.equal(finite, torch.isfinite(y)), (index, name)
                assert torch.allclose(x[finite].double(), y[finite].double(), rtol=1e-4, atol=1e-5), (index, name)
            else:
                assert torch.equal(x, y), (index, name)


def test_sequential_statistics_equal_one_forward(family, saved_models):
    folder = saved_models(family)
    model = load_model(folder)
    full = collect(model, TOKENS, GROUPS, SETTINGS, progress=False)
    layered = LayeredCheckpoint(folder)
    assert all(p.is_meta for p in layered.model.parameters())
    seq = collect_sequential(layered, TOKENS, GROUPS, SETTINGS, progress=False)
    assert all(p.is_meta for p in layered.model.parameters())  # every layer was freed again
    assert_same(full, seq)
    # the statistics cache finds the same entry from either: same fingerprint, read per layer
    assert model_fingerprint(layered.model) == model_fingerprint(model)


def test_one_cache_entry_for_both_paths_and_outputs_per_layer(saved_models, tmp_path):
    folder = saved_models("qwen3_moe")
    model = load_model(folder)
    cache = str(tmp_path / "stats")
    seq = get_stats(LayeredCheckpoint(folder).model, lambda: TOKENS, ["outputs"], cache, SETTINGS, progress=False)
    files = sorted(os.listdir(os.path.join(cache, "outputs")))
    assert files == [f"layer-{i}.pt" for i in sorted(seq)]
    layer = seq[min(seq)]
    assert isinstance(layer, LayerStats) and "all_outputs" in layer.files  # read from its file on access

    def no_pass():
        raise AssertionError("a cache hit must not calibrate")

    hit = get_stats(model, no_pass, ["outputs", "routing"], cache, SETTINGS, progress=False)
    full = collect(model, TOKENS, GROUPS, SETTINGS, progress=False)
    assert_same({i: {n: hit[i][n] for n in hit[i]} for i in hit},
                {i: {n: t for n, t in s.items() if n in hit[i]} for i, s in full.items()})


def test_a_damaged_layer_file_is_collected_again(saved_models, tmp_path):
    folder = saved_models("mixtral")
    model = load_model(folder)
    cache = str(tmp_path / "stats")
    get_stats(model, lambda: TOKENS, ["outputs"], cache, SETTINGS, progress=False)
    with open(os.path.join(cache, "outputs", "layer-1.pt"), "wb") as f:
        f.write(b"truncated")
    calls = []
    with pytest.warns(UserWarning, match="layer-1.pt"):
        again = get_stats(model, lambda: calls.append(1) or TOKENS, ["outputs"], cache, SETTINGS, progress=False)
    assert calls == [1] and again[1]["all_outputs"].shape[1] == 8


def test_a_checkpoint_without_safetensors_is_refused_with_the_fix(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mixtral"}')
    with pytest.raises((LayeredLoadError, ValueError), match="safetensors"):
        LayeredCheckpoint(str(tmp_path))
