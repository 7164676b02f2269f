"""The testbed generator, splits, calibration texts, tokenizer and zoo names."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from moebench.testbed import data, domains, zoo
from moebench.testbed.domains import DOMAINS


@pytest.mark.parametrize("domain", DOMAINS)
def test_generator_is_deterministic(domain):
    first = [domains.GENERATORS[domain](random.Random(7)) for _ in range(3)]
    again = [domains.GENERATORS[domain](random.Random(7)) for _ in range(3)]
    assert first == again
    assert data.items(domain, "eval", 20, seed=5) == data.items(domain, "eval", 20, seed=5)


@pytest.mark.parametrize("domain", DOMAINS)
def test_items_are_well_formed(domain):
    for item in data.items(domain, "train", 50):
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.choices[item.gold] == item.answer
        assert data.split_of(item) == "train"


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_are_disjoint(domain):
    prompts = {s: {it.prompt for it in data.items(domain, s, 150, seed=1)} for s in data.SPLITS}
    assert not prompts["train"] & prompts["eval"]
    assert not prompts["train"] & prompts["calib"]
    assert not prompts["calib"] & prompts["eval"]


def test_world_is_fixed():
    assert len(domains.WORLD) == domains.N_PEOPLE
    assert domains._build_world() == domains.WORLD


def test_calibration_texts():
    mix = data.calibration_texts("mix", n=6, seed=0)
    assert mix == data.calibration_texts("mix", n=6, seed=0)
    assert mix != data.calibration_texts("mix", n=6, seed=1)
    assert len(mix) == 6 and all(t.count("\n") == 7 for t in mix)
    code = data.calibration_texts("code", n=3, seed=0)
    assert all("print" in t for t in code)
    with pytest.raises(ValueError, match="unknown testbed domain"):
        data.calibration_texts("poetry", n=1)


def test_tokenizer_splits_digits_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    from moebench.testbed.tokenizer import train_tokenizer

    tok = train_tokenizer(n_items=3000)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "34 + 58 = 92\nreverse k q m -> m q k"
    assert loaded.decode(loaded(text)["input_ids"]) == text
    pieces = loaded.convert_ids_to_tokens(loaded("164")["input_ids"])
    assert pieces == ["1", "6", "4"]


def test_resolve_model_names():
    assert zoo.resolve_model("mistralai/Mixtral-8x7B-v0.1") == "mistralai/Mixtral-8x7B-v0.1"
    assert zoo.resolve_model("/some/folder") == "/some/folder"
    for name in zoo.model_names():
        if zoo.is_available(name):
            folder = Path(zoo.resolve_model(name))
            assert folder.is_absolute() and (folder / "config.json").is_file()


def test_zoo_list_command():
    out = subprocess.run([sys.executable, "-m", "moebench.cli", "zoo", "list"], capture_output=True,
                         text=True, check=True).stdout
    for name in zoo.model_names():
        assert f"{name}\t{zoo.model_dir(name)}" in out
