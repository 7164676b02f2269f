"""Budgets: an explicit keep is honoured or refused with the nearest valid counts; a ratio may round
and says so once (log, plan); a problem shared by every layer is said once."""

from __future__ import annotations

import logging
import random

import pytest
from conftest import build_tokenizer
from tiny_models import VOCAB, tiny_model

from moebench.cli import main
from moebench.method.pipeline import PlanRequest, make_plan
from moebench.method.registry import budget_note, resolve_budget
from moebench.moe.view import MoEError, MoEView


def test_keep_that_groups_cannot_split_names_the_nearest_counts():
    view = MoEView(tiny_model("deepseek_v3"))  # 8 experts in 2 groups, top_k=2, 2 MoE layers
    with pytest.raises(MoEError) as err:
        resolve_budget(view, keep=5)
    assert str(err.value) == ("impossible budget:\n  keep=5 cannot be split equally over the router's 2 expert "
                              "groups (group-limited routing needs equal drops per group): use keep=4 or keep=6 "
                              "(all 2 MoE layers)")
    with pytest.raises(MoEError, match="use keep=6 or keep=8"):
        resolve_budget(view, keep=7)
    assert resolve_budget(view, keep=6) == {1: 6, 2: 6}


def test_a_problem_of_every_layer_is_said_once_with_the_count(saved_models, tmp_path, capsys):
    assert main(["prune", saved_models("mixtral"), "--method", "weight_norm", "--keep", "9",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("exceeds") == 1
    assert "keep=9 exceeds the 8 experts of the layer (all 2 MoE layers)" in err
    assert not (tmp_path / "o").exists()


def test_a_rounded_ratio_is_logged_once_and_kept_with_the_plan(tmp_path, caplog):
    rng = random.Random(0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(40)) for _ in range(20)))
    model = tiny_model("deepseek_v3")
    view = MoEView(model)
    assert budget_note(view, 0.25, resolve_budget(view, ratio=0.25)) is None  # 2 of 8: exact
    request = PlanRequest(method="frequency", ratio=0.3, calib=f"file:{corpus}", calib_samples=4, calib_seq_len=16,
                          stats_dir=str(tmp_path / "stats"), model_id="tiny")
    with caplog.at_level(logging.WARNING, logger="moebench.method.pipeline"):
        plan = make_plan(model, build_tokenizer(), request, progress=False)
    note = ("ratio=0.3 is rounded to whole experts and equal drops per routing group: 6 of 8 experts kept per "
            "MoE layer, a realised ratio of 0.25")
    assert [r.getMessage() for r in caplog.records] == [f"frequency: {note}"]
    assert plan.extra["budget_note"] == note and plan.extra["ratio_realised"] == 0.25 and plan.ratio == 0.3
    assert set(plan.experts_kept().values()) == {6}
