"""A study's ``recover:`` stage: the recovered cell beside its unrecovered twin, ids, tables, labels, refusals."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from test_grid import make_study

from moebench.grid.results import build_tables
from moebench.grid.runner import run_grid
from moebench.grid.spec import SpecError, load_study
from moebench.report.tables import MetricSpec, load_studies, summary
from moebench.results import load

RECOVER = {"kind": "lora", "data": "testbed:mix", "steps": 6, "batch": 2, "seq_len": 16, "lr": 1e-3}


@pytest.mark.slow  # two cell processes
def test_a_recovered_cell_runs_beside_its_twin_and_is_told_apart(tmp_path, saved_models):
    model = saved_models("mixtral")
    plain = load_study(make_study(tmp_path, model, methods=["frequency"], ratios=[0.5]))
    spec = make_study(tmp_path, model, methods=["frequency", {"name": "frequency", "recover": RECOVER}], ratios=[0.5])
    study = load_study(spec)
    twin, recovered = study.cells
    assert twin.id == plain.cells[0].id and "recover" not in twin.to_dict()  # ids without recover do not change
    assert recovered.recover == {"kind": "lora", "data": "testbed:mix", "steps": 6, "batch": 2, "seq_len": 16,
                                 "lr": 1e-3}
    assert recovered.model_args()["recover"] == "lora" and recovered.model_args()["recover_steps"] == 6

    root = str(tmp_path / "results" / "tiny")
    summary_ = run_grid(study, root, progress=False)
    assert summary_["done"] == 2 and not summary_["failed"]
    runs, _ = build_tables(root)
    by_id = runs.set_index("cell")
    assert by_id.loc[twin.id, "recover"] == "" and json.loads(by_id.loc[recovered.id, "recover"])["kind"] == "lora"
    assert by_id.loc[recovered.id, "recover_s"] > 0 and by_id.loc[recovered.id, "recover_loss_first"] > 0
    assert by_id.loc[twin.id, "experts_kept"] == by_id.loc[recovered.id, "experts_kept"]  # same pruning
    plan = json.loads(Path(root, "cells", recovered.id, "plan.json").read_text())
    assert plan["extra"]["recover"]["kind"] == "lora" and plan["extra"]["recover"]["steps"] == 6
    table = load(root).summary()
    assert sorted(table["method"]) == ["frequency", "frequency+lora"]
    assert sorted(summary(load_studies(root)[0], MetricSpec())["method"]) == ["frequency", "frequency+lora"]
    with open(os.path.join(root, "cells", "index.csv")) as f:
        assert "recover" in f.readline() and ",lora," in f.read()


@pytest.mark.parametrize("entry, problem", [
    ({"name": "naee", "skip": "naee", "recover": RECOVER}, "dynamic skipping's thresholds are measured"),
    ({"name": "premoe_taer", "recover": RECOVER}, "keeps every expert and chooses some per request"),
    ({"name": "frequency", "recover": {**RECOVER, "kind": "qlora"}}, "kind='qlora' must be one of"),
    ({"name": "frequency", "recover": {"kind": "lora"}}, "give the training data"),
])
def test_recover_where_it_cannot_apply_is_refused_before_any_work(tmp_path, saved_models, entry, problem):
    spec = make_study(tmp_path, saved_models("mixtral"), methods=[entry], ratios=[0.5])
    with pytest.raises(SpecError, match=re.escape(problem)):
        load_study(spec)
