"""`moebench prune` writes a model card (README.md with Hub front matter) and provenance in config.json."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import moebench
from moebench.cli import main
from moebench.moe import prune
from moebench.moe.checkpoint import NonUniformCheckpointWarning, load_model


def run_prune(model_dir, corpus, tmp_path, *budget, method="reap"):
    out = tmp_path / f"pruned-{method}"
    code = main(["prune", model_dir, "--method", method, *budget, "--calib", f"file:{corpus}", "--samples", "4",
                 "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"), "--out", str(out)])
    assert code == 0
    return out


def read_card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_pruned_checkpoint_has_a_card_and_loads_unchanged_in_plain_transformers(family, saved_models, corpus,
                                                                                tmp_path):
    base = saved_models(family)
    out = run_prune(base, corpus, tmp_path, "--ratio", "0.5")
    plan = json.loads((out / "plan.json").read_text())
    meta, body = read_card(out)
    assert meta["base_model"] == base.rstrip("/").split("/")[-1] and meta["library_name"] == "transformers"
    assert {"moe", "expert-pruning", "moebench", "moebench-reap"} <= set(meta["tags"])
    mb = meta["moebench"]
    assert (mb["method"], mb["ratio"], mb["keep"], mb["calibration"]) == ("reap", 0.5, None, plan["calib"])
    assert mb["kept_experts"] == {int(k): v for k, v in plan["keep"].items()}
    assert mb["experts_per_layer"] == {int(k): len(v) for k, v in plan["keep"].items()}
    assert mb["version"] == moebench.__version__
    assert "`reap`" in body and "ratio 0.5" in body and plan["calib"] in body and "from_pretrained" in body

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.moebench["method"] == "reap" and plain.config.moebench["calibration"] == plan["calib"]
    assert plain.config.moebench["kept_experts"] == plan["keep"]
    assert plain.config.moebench["base_model"] == meta["base_model"]
    reference = load_model(base).eval()  # the base model pruned in memory to the same plan
    prune(reference, {int(k): v for k, v in plan["keep"].items()})
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, reference(ids).logits)


def test_card_of_a_keep_budget_and_of_uneven_layers(saved_models, corpus, tmp_path):
    out = run_prune(saved_models("mixtral"), corpus, tmp_path, "--keep", "3", method="frequency")
    meta, body = read_card(out)
    assert meta["moebench"]["keep"] == 3 and meta["moebench"]["ratio"] is None and "3 experts kept" in body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonUniformCheckpointWarning)
        uneven = run_prune(saved_models("mixtral"), corpus, tmp_path, "--ratio", "0.5", method="grape")
    meta, body = read_card(uneven)
    counts = meta["moebench"]["experts_per_layer"]
    assert sum(counts.values()) == len(counts) * 4  # global budget: half of 8 experts over all layers
    assert ("load_model" in body) == (len(set(counts.values())) > 1), counts  # says how to load it
    assert load_model(str(uneven)).config.moebench["method"] == "grape"
