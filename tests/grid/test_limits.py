"""Resource limits: inputs far beyond any real one are refused at once, or cost only what is used of them."""

from __future__ import annotations

import json
import os

from conftest import build_tokenizer

from moebench.calib.sources import DOC_CHUNK_CHARS, parse_calibration
from moebench.cli import main
from moebench.grid.spec import SpecError, load_study


class Counting:
    """The real tokenizer, recording how many characters each call tokenises."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, texts, **kwargs):
        self.sizes.append(sum(len(t) for t in texts))
        return self.tokenizer(texts, **kwargs)


def test_a_huge_calibration_document_is_tokenised_only_as_far_as_needed(tmp_path):
    words = " ".join(f"w{i % 90}" for i in range(10_000_000))  # one ~40 MB document
    path = tmp_path / "one.txt"
    path.write_text(words)
    tokenizer = Counting(build_tokenizer())
    tokens = parse_calibration(f"file:{path}", samples=4, seq_len=64).tokens(tokenizer)
    assert tokens.shape == (4, 64)
    assert max(tokenizer.sizes) <= DOC_CHUNK_CHARS and sum(tokenizer.sizes) <= 2 * DOC_CHUNK_CHARS
    expected = build_tokenizer()(words[:10_000], add_special_tokens=False)["input_ids"][:256]
    assert tokens.flatten().tolist() == expected  # the same tokens as tokenising it whole


BOMB = """name: bomb
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
models: [*h]
"""


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path, capsys):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(BOMB)
    assert main(["grid", "run", str(spec), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "more than 20000 values" in err and len(err) < 2000


def test_a_study_of_too_many_cells_is_refused_unless_max_cells_allows_it(tmp_path):
    ratios = [round(i / 1000, 3) for i in range(1, 751)]  # every budget the testbed's top-2 allows
    spec = {"name": "huge", "models": ["testbed-8e"], "methods": ["random", "frequency", "reap", "weight_norm",
                                                                  "soft_activation", "ean"],
            "ratios": ratios, "calibration": ["testbed:mix", "testbed:arithmetic"], "tasks": ["testbed_logic_quick"]}
    path = tmp_path / "huge.yaml"
    path.write_text(json.dumps(spec))
    try:
        load_study(str(path))
        raise AssertionError("a study of ~7500 cells was accepted")
    except SpecError as err:
        assert "more than 5000 cells" in str(err) and "set max_cells" in str(err)
    path.write_text(json.dumps({**spec, "max_cells": 10_000}))
    assert len(load_study(str(path)).cells) > 5000


def test_inspect_refuses_a_config_beyond_any_real_model(saved_models, tmp_path, capsys):
    folder = tmp_path / "absurd"
    folder.mkdir()
    with open(os.path.join(saved_models("mixtral"), "config.json")) as f:
        config = json.load(f)
    config.update(num_hidden_layers=100_000, num_local_experts=10_000)
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(folder)]) == 2
    assert "num_hidden_layers=100000, beyond any real model" in capsys.readouterr().err
