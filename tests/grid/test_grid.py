"""The grid end to end: cells through pruned_moe, one calibration, resume after kill -9, determinism."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny_models import VOCAB

import moebench.calib.cache as stats_cache
from moebench.grid.results import SPEEDUPS, build_tables
from moebench.grid.runner import run_grid, status
from moebench.grid.spec import load_study

pytestmark = pytest.mark.slow  # every test runs a grid: one cell subprocess per cell

# measured figures (memory, speed, load, durations) and the commit: everything else must reproduce exactly
TIMING = ["load_peak_bytes", "run_peak_bytes", "prefill_tokens_per_s", "prefill_tokens_per_s_p90",
          "decode_tokens_per_s", "decode_tokens_per_s_p90", "calibration_s", "planning_s", "eval_s", "git_sha",
          "eval_requests_per_s", "ref_prefill_tokens_per_s", "ref_decode_tokens_per_s", *SPEEDUPS, "load_before",
          "load_after", "others_cpu", "under_load",
          *[f"{s}_tokens_per_s_{q}" for s in ("prefill", "decode") for q in ("p10", "min", "max")]]


@pytest.fixture
def study_file(tmp_path, saved_models):
    """A 2 methods x 3 ratios study on a tiny Mixtral, one local task, a file corpus."""
    return make_study(tmp_path, saved_models("mixtral"))


def make_study(tmp_path, model, **overrides) -> str:
    """Write a study spec (defaults: frequency and reap at 3 ratios, no baseline) and return its path."""
    rng = random.Random(0)
    corpus = tmp_path / "calib.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(40)) for _ in range(20)))
    spec = {"name": "tiny", "models": [model], "methods": ["frequency", "reap"], "baseline": False,
            "ratios": [0.25, 0.5, 0.75], "calibration": [f"file:{corpus}"], "tasks": ["testbed_logic"],
            "lm_eval": {"limit": 8, "batch_size": 8}, "calib_samples": 4, "calib_seq_len": 16, "measure": False,
            "stats_dir": str(tmp_path / "stats"), "executor": {"kind": "local", "parallel": 1}, **overrides}
    path = tmp_path / f"study-{len(list(tmp_path.glob('study-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def tables_without_timing(root):
    runs, scores = build_tables(root)
    return runs.drop(columns=TIMING), scores


def test_grid_runs_every_cell_with_one_calibration(study_file, tmp_path, monkeypatch):
    passes = []
    real = stats_cache.collect
    monkeypatch.setattr(stats_cache, "collect", lambda *a, **k: passes.append(1) or real(*a, **k))
    study = load_study(study_file)
    root = str(tmp_path / "results" / "tiny")
    summary = run_grid(study, root, progress=False)
    assert summary["cells"] == 6 and summary["done"] == 6 and not summary["failed"]
    assert len(passes) == 1  # one calibration for the whole grid (cells read the cache)
    runs, scores = build_tables(root)
    assert len(runs) == 6 and runs["limited"].all()
    pruned = runs[runs["method"] == "reap"].sort_values("ratio")
    assert pruned["expert_bytes"].is_monotonic_decreasing
    assert set(scores["task"]) == {"testbed_logic"} and len(scores) == 6
    folder = os.path.join(root, "cells", runs["cell"][0])
    cell = json.loads(Path(os.path.join(folder, "cell.json")).read_text())
    assert {"torch_version", "lm_eval_version", "device", "dtype", "expert_kernel"} <= set(cell["env"])
    plan = json.loads(Path(os.path.join(folder, "plan.json")).read_text())
    assert plan["method"] == cell["spec"]["method"] and plan["keep"]
    again = run_grid(study, root, progress=False)  # all done: nothing re-runs
    assert again["done"] == 0 and again["skipped"] == 6


def test_same_cell_twice_gives_identical_scores(tmp_path, saved_models):
    study = load_study(make_study(tmp_path, saved_models("mixtral"), methods=["reap"], ratios=[0.5]))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_grid(study, a, progress=False)
    run_grid(study, b, progress=False)
    pd.testing.assert_frame_equal(tables_without_timing(a)[1], tables_without_timing(b)[1])


def test_kill_9_mid_grid_then_resume(tmp_path, saved_models):
    study_file = make_study(tmp_path, saved_models("mixtral"), methods=["frequency"], baseline=True)
    reference = str(tmp_path / "ref")
    run_grid(load_study(study_file), reference, progress=False)
    results = str(tmp_path / "results")
    root = os.path.join(results, "tiny")
    cmd = [sys.executable, "-m", "moebench.cli", "grid", "run", study_file, "--results", results]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(status(load_study(study_file), root)["done"]) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the grid and the cell it was running, mid-flight
    proc.wait()
    states = status(load_study(study_file), root)
    assert 1 <= len(states["done"]) < 4
    done_before = {d: os.path.getmtime(os.path.join(d, "DONE")) for d in states["done"]}
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    states = status(load_study(study_file), root)
    assert len(states["done"]) == 4 and not states["failed"] and not states["pending"]
    for folder, mtime in done_before.items():  # finished cells were not run again
        assert os.path.getmtime(os.path.join(folder, "DONE")) == mtime
    for got, want in zip(tables_without_timing(root), tables_without_timing(reference), strict=True):
        pd.testing.assert_frame_equal(got.drop(columns=["study"], errors="ignore"),
                                      want.drop(columns=["study"], errors="ignore"))


def test_failed_cell_writes_failure_and_is_retried(study_file, tmp_path):
    spec = yaml.safe_load(Path(study_file).read_text())
    model = tmp_path / "model"
    shutil.copytree(spec["models"][0], model)  # a private copy we can take away
    spec.update(models=[str(model)], methods=["random"], ratios=[0.5], baseline=True)
    path = tmp_path / "retry.yaml"
    path.write_text(yaml.safe_dump(spec))
    study = load_study(str(path))  # validated while the model is there
    os.rename(model, tmp_path / "away")
    root = str(tmp_path / "retry")
    summary = run_grid(study, root, progress=False)
    assert len(summary["failed"]) == 2
    failure = json.loads(Path(os.path.join(summary["failed"][0], "failure.json")).read_text())
    assert "Traceback" in failure["traceback"]
    os.rename(tmp_path / "away", model)
    summary = run_grid(study, root, progress=False)
    assert summary["done"] == 2 and not summary["failed"]
    assert all(not os.path.exists(os.path.join(d, "failure.json")) for d in status(study, root)["done"])


def test_grid_measures_latency_per_prompt_length_into_a_table_and_figure(tmp_path, saved_models):
    from moebench.report.figures import Figure
    from moebench.report.maps import latency_vs_input
    from moebench.report.tables import MetricSpec, load_studies, summary

    measure = {"batch": 1, "prompt_len": 8, "new_tokens": 4, "reps": 2, "warmup": 0,
               "latency_lengths": [4, 16, 200]}  # 200 + 4 tokens exceed the tiny model's 128 positions
    study = load_study(make_study(tmp_path, saved_models("mixtral"), methods=["reap"], ratios=[0.5],
                                  baseline=True, measure=measure))
    root = str(tmp_path / "results" / "tiny")
    assert run_grid(study, root, progress=False)["done"] == 2
    latency = pd.read_csv(os.path.join(root, "tables", "latency.csv"))
    runs = pd.read_csv(os.path.join(root, "tables", "runs.csv"))
    assert sorted(latency["cell"].unique()) == sorted(runs["cell"])
    assert sorted(latency["prompt_len"].unique()) == [4, 16]
    assert (latency["ms_per_token"] > 0).all() and (latency["ms_per_token_p90"] >= latency["ms_per_token"]).all()
    assert (latency["new_tokens"] == 4).all() and (latency["prefill_ms"] > 0).all()
    assert (latency["ms_per_token_p10"] <= latency["ms_per_token"]).all()
    for stage in ("prefill", "decode"):  # the spread over the repetitions, fastest to slowest
        order = [f"{stage}_tokens_per_s_{q}" for q in ("max", "p10")] + [f"{stage}_tokens_per_s"] + [
            f"{stage}_tokens_per_s_{q}" for q in ("p90", "min")]
        assert (runs[order].diff(axis=1).iloc[:, 1:] <= 1e-9).all().all(), runs[order]
    from moebench.grid.items import read_items

    items = read_items(os.path.join(root, "cells", runs["cell"][0]))  # 8 items (limit) of testbed_logic
    assert sorted(items["doc_id"]) == list(range(8)) and set(items["metric"]) == {"acc"}
    assert set(items["value"]) <= {0.0, 1.0} and (items["doc_hash"].str.len() == 12).all()
    logic = pd.read_csv(os.path.join(root, "tables", "scores.csv")).query("cell == @runs.cell[0]")
    assert items["value"].mean() == pytest.approx(logic.query("metric == 'acc'")["value"].iloc[0])
    cell = json.loads(Path(os.path.join(root, "cells", runs["cell"][0], "cell.json")).read_text())
    assert cell["metrics"]["latency_dropped"]["prompt_len"] == [200]
    assert "max_position_embeddings=128" in cell["metrics"]["latency_dropped"]["why"]
    (data,) = load_studies(root)
    figure = latency_vs_input(data.latency, summary(data, MetricSpec()))
    assert isinstance(figure, Figure), figure
