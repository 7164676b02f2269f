"""Each committed testbed checkpoint loads offline and reproduces its model-card scores on a fixed subset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moebench.testbed import zoo
from moebench.testbed.card import SUBSET_LIMIT, evaluate

NAMES = zoo.model_names()


def test_checkpoints_fit_the_size_budget():
    total = sum(f.stat().st_size for n in NAMES for f in zoo.model_dir(n).glob("*") if f.is_file())
    assert total <= 20 * 2**20, f"testbed checkpoints take {total / 2**20:.1f} MiB (budget 20)"


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_is_complete(name):
    folder = Path(zoo.resolve_model(name))
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "scores.json", "training.json"):
        assert (folder / file).is_file(), f"{name} lacks {file}"
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["full"]["testbed_mc"]["acc,none"] > 0.5
    assert f"{scores['full']['testbed_mc']['acc,none']:.4f}" in (folder / "README.md").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_reproduces_its_subset_scores(name):
    folder = zoo.resolve_model(name)
    expected = json.loads((Path(folder) / "scores.json").read_text())["subset"]
    assert expected["limit"] == SUBSET_LIMIT
    got = evaluate(folder, limit=SUBSET_LIMIT)
    for task, metrics in expected["scores"].items():
        for metric, value in metrics.items():
            assert math.isclose(got[task][metric], value, rel_tol=2e-3, abs_tol=1e-3), (task, metric)


def test_committed_tokenizer_is_the_trained_one():
    from transformers import AutoTokenizer

    from moebench.testbed.tokenizer import train_tokenizer

    fresh = train_tokenizer().backend_tokenizer.to_str()
    for name in NAMES:
        assert AutoTokenizer.from_pretrained(zoo.resolve_model(name)).backend_tokenizer.to_str() == fresh
