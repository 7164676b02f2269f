"""Study specs with bad values are refused before anything is written, each problem naming the key,
the value and the fix; names never lead outside the results folder."""

from __future__ import annotations

import os

import pytest
import yaml

from moebench.cli import main
from moebench.grid.checks import accepts

CASES = [
    ({"name": "../../x"}, "study name '../../x' cannot be a folder name"),
    ({"name": "/tmp/abs"}, "study name '/tmp/abs' cannot be a folder name"),
    ({"name": "a/b"}, "e.g. 'a-b'"),
    ({"name": 123}, "study name 123 (read as int, not text: quote it in YAML)"),
    ({"calib_samples": 0}, "calib_samples=0 must be a whole number >= 1"),
    ({"calib_samples": "lots"}, "calib_samples='lots' must be a whole number >= 1"),
    ({"calib_samples": 1e12}, "calib_samples=1000000000000.0 must be a whole number >= 1"),
    ({"calib_samples": 10_000_000, "calib_seq_len": 64},
     "calib_samples x calib_seq_len = 10,000,000 x 64 = 640,000,000 calibration tokens, more than moebench's limit"),
    ({"seed": "abc"}, "seed='abc' must be a whole number >= 0"),
    ({"calib_seq_len": -5}, "calib_seq_len=-5 must be a whole number >= 1"),
    ({"dtype": "float99"}, "dtype='float99' must be one of auto, float32, bfloat16, float16, float64"),
    ({"lm_eval": {"num_fewshott": 1}}, "lm_eval: unknown key 'num_fewshott' (did you mean 'num_fewshot'?)"),
    ({"lm_eval": {"batch_size": "big"}}, "lm_eval: batch_size='big' must be a whole number >= 1, 'auto' or 'auto:N'"),
    ({"lm_eval": {"num_fewshot": "two"}}, "lm_eval: num_fewshot='two' must be int | None"),
    ({"lm_eval": {"tasks": ["x"]}}, "lm_eval: 'tasks' is set by moebench (use the study's 'tasks')"),
    ({"lm_eval": {"limit": 0}}, "lm_eval: limit=0 must be a whole number of items >= 1 or a fraction in (0, 1]"),
    ({"ratios": [False]}, "ratio False must be a number in [0, 1)"),
    ({"ratios": ["half"]}, "ratio 'half' must be a number in [0, 1)"),
    ({"methods": [{"frequency": 1}]}, "methods: entry {'frequency': 1} has no 'name'; write it as {name: frequency"),
    ({"methods": [{"name": "frequency", "parms": {}}]},
     "method frequency: unknown key 'parms' (did you mean 'params'?)"),
    ({"models": [7]}, "models: 7 must be a name (text)"),
    ({"baseline": "yes"}, "baseline='yes' must be true or false"),
    ({"device": "gpu0"}, "device='gpu0' must be a torch device"),
    ({"executor": {"kind": "local", "parallel": 0}}, "executor: parallel=0 must be >= 1"),
    ({"executor": {"kind": "local", "parallel": "two"}}, "executor: parallel='two' must be int"),
    ({"executor": {"kind": "slurm", "max_paralel": 2}}, "unknown option 'max_paralel' for the slurm executor"),
    ({"include_path": ["/no/such/folder"]}, "include_path: '/no/such/folder' is not a folder of lm-eval task configs"),
]


def write_spec(tmp_path, model, **overrides) -> str:
    spec = {"name": "checked", "models": [model], "methods": ["frequency"], "ratios": [0.5],
            "calibration": ["testbed:mix"], "tasks": ["testbed_logic"], "measure": False, **overrides}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def written(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("overrides, problem", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_values_are_refused_before_anything_is_written(saved_models, tmp_path, capsys, overrides, problem):
    spec = write_spec(tmp_path, saved_models("mixtral"), **overrides)
    before = written(tmp_path)
    for action in ("status", "run"):
        assert main(["grid", action, spec, "--results", str(tmp_path / "results")]) == 2
        err = capsys.readouterr().err
        assert "moebench grid: error: study spec has" in err and problem in err, err
        assert "Traceback" not in err
    assert written(tmp_path) == before  # no results folder, nothing outside it either


def test_a_results_folder_linked_elsewhere_is_refused(saved_models, tmp_path, capsys):
    results, outside = tmp_path / "results", tmp_path / "outside"
    results.mkdir()
    outside.mkdir()
    (results / "checked").symlink_to(outside)
    assert main(["grid", "run", write_spec(tmp_path, saved_models("mixtral")), "--results", str(results)]) == 2
    assert f"resolves to {outside}, outside {results}" in capsys.readouterr().err
    assert os.listdir(outside) == []


def test_valid_lm_eval_keys_of_simple_evaluate_pass(saved_models, tmp_path, capsys):
    spec = write_spec(tmp_path, saved_models("mixtral"),
                      lm_eval={"num_fewshot": 0, "batch_size": "auto:2", "limit": 0.5, "bootstrap_iters": 0,
                               "gen_kwargs": {"temperature": 0}, "apply_chat_template": False})
    assert main(["grid", "status", spec, "--results", str(tmp_path / "results")]) == 0
    assert "checked: 2 cells: 0 done, 0 running, 0 failed, 0 broken, 2 pending" in capsys.readouterr().out


@pytest.mark.parametrize("annotation, value, ok", [
    ("int | None", 3, True), ("int | None", None, True), ("int | None", True, False), ("int | None", "3", False),
    ("bool | str", "x", True), ("dict[str, str | int] | None", {"a": 1}, True), ("float", 2, True),
    ("str | dict[str, str | float | int] | None", 5, False), ("TaskManager | None", object(), True),
])
def test_annotations_of_simple_evaluate_are_read_as_types(annotation, value, ok):
    assert accepts(annotation, value) is ok
