"""The one-forward pass puts every expert's outputs on disk as the batches pass, never in memory for all layers."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import sample_ids, tiny_model

import moebench.calib.cache as stats_cache
from moebench.calib.stats import SPILL_PREFIX, CollectSettings, collect, spill_file
from moebench.moe.view import MoEView


def mapped_files() -> dict[str, list[tuple[int, int]]]:
    """This process's file mappings: path -> [(start, end)] address ranges."""
    maps: dict[str, list[tuple[int, int]]] = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                maps.setdefault(parts[5], []).append((start, end))
    return maps


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_spilled_outputs_equal_the_in_memory_ones_and_live_in_their_file(family, tmp_path):
    model = tiny_model(family)
    tokens = sample_ids(6, 12)
    settings = CollectSettings(subsample_tokens=40, batch_size=2)  # three batches append to each file
    groups = ["outputs", "routing"]
    held = collect(model, tokens, groups, settings, progress=False)
    (tmp_path / "layer-1.f32").write_bytes(b"\1" * 64)  # an earlier pass's rows: not read as this one's
    spilled = collect(model, tokens, groups, settings, progress=False, spill_dir=str(tmp_path))
    maps = mapped_files()
    for layer in MoEView(model).layers:
        a, b = held[layer.index], spilled[layer.index]
        assert set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)
        path = spill_file(str(tmp_path), layer.index)
        outputs = b["all_outputs"]
        assert os.path.getsize(path) == outputs.numel() * 4
        address = outputs.untyped_storage().data_ptr()  # backed by the spill file, not by process memory
        assert any(start <= address < end for start, end in maps.get(os.path.realpath(path), []))


def test_get_stats_leaves_no_spill_and_clears_what_dead_passes_left(tmp_path):
    model = tiny_model("mixtral")
    folder = tmp_path / "cache"
    folder.mkdir()
    dead = folder / f"{SPILL_PREFIX}999999999"  # a pass killed mid-way (no such process)
    live = folder / f"{SPILL_PREFIX}{os.getppid()}"  # another pass, still running
    for spill in (dead, live):
        spill.mkdir()
        (spill / "layer-1.f32").write_bytes(b"\0" * 64)
    stats = stats_cache.get_stats(model, lambda: sample_ids(4, 12), ["outputs"], str(folder),
                                  CollectSettings(subsample_tokens=30), progress=False)
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [live.name]
    want = collect(model, sample_ids(4, 12), ["outputs"], CollectSettings(subsample_tokens=30), progress=False)
    for index, layer in want.items():  # read back from the per-layer cache files
        assert torch.equal(stats[index]["all_outputs"], layer["all_outputs"])
