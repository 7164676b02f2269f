"""Study specs: every problem reported at once; expansion into cells."""

from __future__ import annotations

import pytest
import yaml

from moebench.grid.spec import Cell, SpecError, cell_id, load_study, parse_study


def write(tmp_path, spec) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_validation_lists_every_problem_at_once(tmp_path, saved_models):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(dense)
    spec = {"name": "bad", "models": [saved_models("mixtral"), str(dense)],
            "methods": ["reapp", {"name": "random", "params": {"sed": 1}}, {"name": "frequency", "skip": "fast"}],
            "ratios": [0.5, 0.9, 1.5], "calibration": ["c5"], "tasks": ["testbed_arithmetc"], "executer": {},
            "measure": {"reps": 0, "latency_lengths": [64, "long"], "lenghts": [1]}}
    with pytest.raises(SpecError) as err:
        load_study(write(tmp_path, spec))
    text = str(err.value)
    for expected in ["unknown key 'executer' (did you mean 'executor'?)",
                     "method 'reapp' is unknown (did you mean 'reap'?)",
                     "method random has no parameter 'sed' (did you mean 'seed'?)",
                     "method frequency: skip='fast' must be none or naee",
                     "ratio 1.5 must be a number in [0, 1)",
                     "calibration 'c5'",
                     "task 'testbed_arithmetc' is unknown to lm-eval (did you mean 'testbed_arithmetic'?)",
                     "'llama' is not a supported MoE family",
                     "ratio 0.9: ratio=0.9 leaves 1 experts but the router selects top_k=2; use ratio <= 0.750 or "
                     "keep >= 2 (all 2 MoE layers)",
                     "measure: unknown key 'lenghts'", "measure: reps=0 must be a whole number >= 1",
                     "measure: latency_lengths=[64, 'long'] must be a list of prompt lengths >= 1"]:
        assert expected in text, expected
    assert text.startswith("study spec has 12 problem(s)")


def test_expansion_dedupes_data_free_methods_and_expands_parameter_lists(saved_models):
    spec = {"name": "ok", "models": [saved_models("mixtral")],
            "methods": ["frequency", {"name": "random", "params": {"seed": [0, 1, 2]}}],
            "ratios": [0.25, 0.5], "calibration": ["testbed:mix", "testbed:arithmetic"], "tasks": ["testbed_logic"]}
    study = parse_study(spec)
    methods = [(c.method, c.params.get("seed"), c.ratio, c.calib) for c in study.cells]
    assert methods[0] == ("none", None, 0.0, None)  # the unpruned baseline
    assert sum(m[0] == "frequency" for m in methods) == 4  # 2 ratios x 2 calibration sets
    assert sum(m[0] == "random" for m in methods) == 6  # 3 seeds x 2 ratios, no calibration
    assert len({c.id for c in study.cells}) == len(study.cells) == 11
    assert all(c.id == cell_id(c.to_dict()) and Cell.from_dict(c.to_dict()) == c for c in study.cells)
    assert study.calibrations() == [(saved_models("mixtral"), "testbed:arithmetic"),
                                    (saved_models("mixtral"), "testbed:mix")]


def test_a_method_entry_may_name_its_own_ratios(saved_models):
    spec = {"name": "ok", "models": [saved_models("mixtral")], "ratios": [0.25, 0.5, 0.75],
            "methods": ["frequency", {"name": "hc_smoe", "ratios": [0.25, 0.5]}],
            "calibration": ["testbed:mix"], "tasks": ["testbed_logic"]}
    study = parse_study(spec)
    assert sorted(c.ratio for c in study.cells if c.method == "hc_smoe") == [0.25, 0.5]
    assert sorted(c.ratio for c in study.cells if c.method == "frequency") == [0.25, 0.5, 0.75]
    with pytest.raises(SpecError, match=r"ratio 1.5 must be a number in \[0, 1\)"):
        parse_study({**spec, "methods": [{"name": "hc_smoe", "ratios": [1.5]}]})


def test_committed_demo_cell_ids_do_not_change():
    """Cells of specs without the statistics settings keep their ids: the committed demo's folder names."""
    import os
    from importlib.resources import files

    root = os.path.join(os.path.dirname(__file__), "..", "..", "results", "demo", "cells")
    study = parse_study(yaml.safe_load(files("moebench.testbed").joinpath("demo_study.yaml").read_text()))
    committed = {name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))}
    assert len(committed) >= 52 and committed <= {c.id for c in study.cells}


def test_statistics_settings_reach_the_cells_and_their_model_args(tmp_path, saved_models):
    base = {"name": "s", "models": [saved_models("mixtral")], "methods": ["naee"], "ratios": [0.5],
            "calibration": ["testbed:mix"], "tasks": ["testbed_mc_quick"], "measure": False}
    plain = load_study(write(tmp_path, base)).cells
    tuned = load_study(write(tmp_path, {**base, "subsample_tokens": 0, "ratio_samples": 500})).cells
    assert "subsample_tokens" not in plain[1].to_dict() and plain[1].subsample_tokens is None
    assert tuned[1].subsample_tokens == 0 and tuned[1].ratio_samples == 500
    assert tuned[1].id != plain[1].id and tuned[0].model_args().get("subsample_tokens") is None  # baseline: no stats
    assert {"subsample_tokens": 0, "ratio_samples": 500}.items() <= tuned[1].model_args().items()
    assert Cell.from_dict(tuned[1].to_dict()) == tuned[1]
    with pytest.raises(SpecError, match="subsample_tokens=-1 must be a whole number >= 0"):
        load_study(write(tmp_path, {**base, "subsample_tokens": -1}))
