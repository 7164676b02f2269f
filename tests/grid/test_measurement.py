"""Each cell's memory and speed measured as stated: its own peaks (not the runner's), a run peak that drops
with the pruning ratio, the reset after the plan is applied, and speed paired with the unpruned model."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import yaml
from conftest import build_tokenizer
from tiny_models import VOCAB, tiny_model

from moebench.grid.results import build_tables
from moebench.grid.runner import prepare, run_grid
from moebench.grid.spec import load_study
from moebench.measure import memory
from moebench.measure.memory import MemoryMeter, host_peak_bytes

MEASURE = {"batch": 1, "prompt_len": 16, "new_tokens": 4, "reps": 3, "warmup": 1}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A Mixtral whose experts hold ~200 MB (fp32): pruning a quarter frees ~50 MB, well above the noise of a
    process's resident set (about 10 MB from run to run)."""
    folder = tmp_path_factory.mktemp("wide")
    tiny_model("mixtral", hidden_size=128, intermediate_size=4096, num_hidden_layers=4, head_dim=32).save_pretrained(
        folder)
    build_tokenizer().save_pretrained(folder)
    return str(folder)


def study(tmp_path, model, **overrides) -> str:
    rng = random.Random(0)
    corpus = tmp_path / "calib.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(40)) for _ in range(20)))
    spec = {"name": "mem", "models": [model], "methods": ["frequency"], "ratios": [0.25, 0.5],
            "calibration": [f"file:{corpus}"], "tasks": ["testbed_logic"], "lm_eval": {"limit": 8, "batch_size": 8},
            "calib_samples": 4, "calib_seq_len": 16, "measure": MEASURE, "stats_dir": str(tmp_path / "stats"),
            "executor": {"kind": "local", "parallel": 1}, **overrides}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_run_peak_is_the_cells_own_and_drops_with_the_ratio(tmp_path, wide_model):
    ballast = torch.ones(1536 * 2**20 // 4)  # the runner's own high-water mark, far above any cell's
    runner_peak = host_peak_bytes()[0]
    root = str(tmp_path / "results" / "mem")
    summary = run_grid(load_study(study(tmp_path, wide_model)), root, progress=False)
    assert summary["done"] == 3 and not summary["failed"]
    del ballast
    runs = build_tables(root)[0].set_index("ratio").sort_index()
    assert list(runs.index) == [0.0, 0.25, 0.5] and set(runs["memory_measure"]) == {"host_rss (VmHWM)"}
    for ratio, row in runs.iterrows():  # each cell's own peaks: below the runner's by far (it inherited them before)
        assert 0 < row["run_peak_bytes"] < runner_peak - 600 * 2**20, ratio
        assert 0 < row["load_peak_bytes"] < runner_peak - 600 * 2**20, ratio
    freed = runs["expert_bytes"].iloc[0] - runs["expert_bytes"]
    assert freed[0.25] > 20e6 and freed[0.5] > 45e6
    drop = runs["run_peak_bytes"].iloc[0] - runs["run_peak_bytes"]
    # the run peak falls with the ratio, by at least half of what pruning freed (the rest is allocator noise)
    assert drop[0.25] > 0.5 * freed[0.25] and drop[0.5] - drop[0.25] > 0.5 * (freed[0.5] - freed[0.25]), drop
    assert (runs["weight_bytes"] == runs["expert_bytes"] + runs["other_bytes"]).all()
    # speed: paired with the unpruned model in the cell's process; the unpruned cell is its own reference
    assert list(runs["speed_pairing"]) == ["self", "interleaved", "interleaved"]
    assert runs.loc[0.0, "decode_speedup"] == 1.0 and runs["ref_decode_tokens_per_s"].iloc[1:].gt(0).all()
    for ratio in (0.25, 0.5):
        row = runs.loc[ratio]
        assert row["decode_speedup_lo"] <= row["decode_speedup"] <= row["decode_speedup_hi"]
        assert row["speed_kernel"] == row["expert_kernel"] and row["cpu_cores"] >= 1 and row["others_cpu"] >= 0
        with open(os.path.join(root, "cells", row["cell"], "cell.json")) as f:
            cell = json.load(f)
        ratios = cell["metrics"]["speed_ratios"]["decode"]
        assert len(ratios) == MEASURE["reps"] and row["decode_speedup"] == pytest.approx(sorted(ratios)[1])


class FakeCuda:
    """torch.cuda's peak bookkeeping for two devices, recording the calls (no GPU needed)."""

    def __init__(self):
        self.allocated = {0: 5_000, 1: 3_000}
        self.peak = {0: 9_000, 1: 4_000}
        self.calls = []

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda d=None: self.calls.append(("sync", d.index)))
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.calls.append(("empty_cache",)))
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda d: self.peak[d.index])
        monkeypatch.setattr(cuda, "current_device", lambda: 0)

        def reset(d):
            self.calls.append(("reset", d.index))
            self.peak[d.index] = self.allocated[d.index]

        monkeypatch.setattr(cuda, "reset_peak_memory_stats", reset)


def test_gpu_meter_sums_devices_and_resets_after_emptying_the_cache(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    meter = MemoryMeter([torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cpu")])
    assert meter.describe() == {"memory_measure": "cuda_allocated", "memory_devices": ["cuda:0", "cuda:1"]}
    assert meter.end_load() == 13_000  # both devices' peaks since the start
    assert fake.calls == [("sync", 0), ("sync", 1), ("sync", 0), ("empty_cache",), ("reset", 0), ("sync", 1),
                          ("empty_cache",), ("reset", 1)]
    fake.peak[0] += 2_000  # the run allocates on device 0
    assert meter.run_peak() == 5_000 + 2_000 + 3_000
    with pytest.raises(RuntimeError, match="before end_load"):
        MemoryMeter(["cuda:0"]).run_peak()


def test_cell_resets_the_peak_after_the_plan_is_applied_and_before_evaluating(tmp_path, wide_model, monkeypatch):
    """The GPU path's order in a real cell (run in this process on the CPU, the CUDA calls observed)."""
    from moebench.eval.model import PrunedMoELM
    from moebench.grid import cell as cell_module

    fake, events = FakeCuda(), []
    fake.install(monkeypatch)
    real_apply = PrunedMoELM.apply_plan

    def apply_plan(self):
        record = real_apply(self)
        events.append(("applied", self.model.config.num_local_experts))
        return record

    monkeypatch.setattr(PrunedMoELM, "apply_plan", apply_plan)
    monkeypatch.setattr(memory, "model_devices", lambda model: [torch.device("cuda", 0)])  # the model "is" on a GPU
    monkeypatch.setattr(memory, "reset_device_peaks", lambda devices: events.append(("reset", list(map(str, devices)))))
    real_eval = cell_module._evaluate
    monkeypatch.setattr(cell_module, "_evaluate", lambda lm, c: events.append(("evaluate",)) or real_eval(lm, c))
    spec = load_study(study(tmp_path, wide_model, baseline=False, ratios=[0.5], measure=False))
    folder = prepare(spec, str(tmp_path / "results" / "mem"))[0]  # the cell calibrates into the study's cache
    cell_module.evaluate(folder)
    assert events == [("applied", 4), ("reset", ["cuda:0"]), ("evaluate",)]
    with open(os.path.join(folder, "cell.json")) as f:
        metrics = json.load(f)["metrics"]
    assert metrics["memory_measure"] == "cuda_allocated" and metrics["load_peak_bytes"] == 9_000
    assert metrics["run_peak_bytes"] == 9_000  # the fake reset was observed only: the peak stayed


def test_offload_and_skipping_give_the_previous_kernel_back(saved_models):
    from transformers import AutoModelForCausalLM

    from moebench.moe.kernels import KERNEL_NAME
    from moebench.moe.offload import ExpertOffloader
    from moebench.moe.skipping import disable_skipping, enable_skipping

    model = AutoModelForCausalLM.from_pretrained(saved_models("mixtral"))
    before = model.config._experts_implementation
    assert before != KERNEL_NAME
    betas = {0: 0.5, 1: 0.5}
    enable_skipping(model, betas)
    assert model.config._experts_implementation == KERNEL_NAME
    disable_skipping(model)
    assert model.config._experts_implementation == before
    offloader = ExpertOffloader(model)
    enable_skipping(model, betas)  # both need moebench's kernel: the last one removed gives it back
    offloader.close()
    assert model.config._experts_implementation == KERNEL_NAME
    disable_skipping(model)
    assert model.config._experts_implementation == before
    model.set_experts_implementation("eager")  # a kernel the user chose is what comes back
    ExpertOffloader(model).close()
    assert model.config._experts_implementation == "eager"
