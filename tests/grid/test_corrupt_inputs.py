"""Damaged or tampered inputs get a clear error naming the file (and the cell), on every path that reads them."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import build_tokenizer
from tiny_models import tiny_model

from moebench.cli import main
from moebench.method.plan import Plan, plan_problem

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "report"))
from test_report import make_results


@pytest.fixture
def truncated_model(tmp_path):
    folder = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(folder, max_shard_size="100KB")
    build_tokenizer().save_pretrained(folder)
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # a download cut short
    return folder, shards[1].name


@pytest.mark.parametrize("path", ["--sequential", "--no-sequential"])
def test_a_truncated_shard_is_named_on_both_paths(truncated_model, path, tmp_path, corpus, capsys):
    folder, shard = truncated_model
    code = main(["prune", str(folder), "--method", "frequency", "--ratio", "0.5", "--calib", f"file:{corpus}",
                 "--samples", "4", "--seq-len", "16", "--device", "cpu", path, "--stats-dir", str(tmp_path / "s"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and shard in err and "damaged safetensors file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_yaml_tag_in_a_study_is_refused_naming_the_file_and_line(tmp_path, capsys):
    spec = tmp_path / "study.yaml"
    spec.write_text("name: s\nmodels: [testbed-8e]\nmethods: !!python/object/apply:os.system ['true']\n")
    assert main(["grid", "run", str(spec), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and "line 3" in err and "no tags" in err and "Traceback" not in err


TAMPERED = {"out of range": [0, 70000], "negative": [-1, 2], "a string": ["1", 2], "twice": [3, 3],
            "a million ids": list(range(1_000_000)), "a bool": [True, 2]}


@pytest.mark.parametrize("kind", sorted(TAMPERED))
def test_a_tampered_plan_is_refused_where_it_is_read(kind, tmp_path, capsys):
    root = make_results(str(tmp_path / "results"), small=True)
    cells = sorted(os.listdir(os.path.join(root, "cells")))
    plan_path = next(os.path.join(root, "cells", c, "plan.json") for c in cells
                     if os.path.exists(os.path.join(root, "cells", c, "plan.json")))
    with open(plan_path) as f:
        data = json.load(f)
    data["keep"][next(iter(data["keep"]))] = TAMPERED[kind]
    with open(plan_path, "w") as f:
        json.dump(data, f)
    assert plan_problem(data) is not None
    with pytest.raises(ValueError, match=r"plan\.json: keep"):
        Plan.load(plan_path)
    assert main(["report", root, "--out", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err
    cell = os.path.basename(os.path.dirname(plan_path))
    assert f"cell {cell}" in err and "keep[" in err and "Traceback" not in err


def test_a_valid_plan_passes():
    plan = Plan("reap", "prune", ratio=0.5, keep={1: [0, 2, 5]})
    assert plan_problem(json.loads(plan.to_json())) is None


def test_a_model_with_nan_weights_is_not_pruned_from_nan_scores(tmp_path, corpus, capsys):
    import torch

    folder = tmp_path / "nan"
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    for path in ("--sequential", "--no-sequential"):
        code = main(["prune", str(folder), "--method", "reap", "--ratio", "0.5", "--calib", f"file:{corpus}",
                     "--samples", "4", "--seq-len", "16", "--device", "cpu", path, "--stats-dir",
                     str(tmp_path / f"s{path}"), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "MoE layer 1" in err and "non-finite" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), 1e300, "fast"])
def test_absurd_metrics_make_a_cell_broken_and_named(value, tmp_path, capsys):
    import shutil

    source = os.path.join(os.path.dirname(__file__), "..", "..", "results", "demo", "cells")
    cell = sorted(os.listdir(source))[1]
    folder = tmp_path / "results" / "study" / "cells" / cell
    shutil.copytree(os.path.join(source, cell), folder, ignore=shutil.ignore_patterns("LOCK"))
    data = json.loads((folder / "cell.json").read_text())
    data["metrics"]["decode_speedup"] = value
    (folder / "cell.json").write_text(json.dumps(data))
    assert main(["collect", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert cell in err and "decode_speedup" in err and "Traceback" not in err
