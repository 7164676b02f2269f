"""Calibration sources: packing, cache keys, local files, hub loading through local copies, errors."""

from __future__ import annotations

import gzip
import json
import random
from itertools import islice

import pytest
import torch

from moebench.calib.sources import KNOWN_SOURCES, PRESETS, Calibration, parse_calibration

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud", "seven", "green"]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained on a few strings, with distinct pad and eos (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>")


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for i in range(n)]


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(documents(60)) + "\n\n\n", encoding="utf-8")
    return path


def test_packing_is_exact_and_seeded(tok, txt):
    cal = parse_calibration(f"file:{txt}", samples=4, seq_len=32, seed=0)
    ids = cal.tokens(tok)
    assert ids.shape == (4, 32) and ids.dtype == torch.long
    assert not (ids == tok.pad_token_id).any()
    stream = []
    for doc in cal.texts():
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.flatten().tolist() == stream[:128]
    assert torch.equal(ids, cal.tokens(tok))
    assert not torch.equal(ids, parse_calibration(f"file:{txt}", 4, 32, seed=1).tokens(tok))


def test_special_token_text_never_becomes_a_special_id(tok, tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text("alpha </s> beta <pad> gamma\n\ndelta omega", encoding="utf-8")
    ids = Calibration(f"file:{path}", samples=1, seq_len=8).tokens(tok).flatten().tolist()
    assert tok.pad_token_id not in ids and ids.count(tok.eos_token_id) <= 2


def test_key_is_readable_and_unique(txt):
    assert parse_calibration("c4").key == "c4-128x2048-s0"
    assert Calibration("C4", 64, 1024, 3).key == "c4-64x1024-s3"
    keys = {Calibration(s, n, length, seed).key for s in ("c4", "gsm8k") for n in (1, 2) for length in (8, 9)
            for seed in (0, 1)}
    assert len(keys) == 16
    hf = Calibration("hf:openai/gsm8k:main:train:Q: {question}").key
    assert hf.startswith("hf-openai-gsm8k-main-train-") and "/" not in hf and " " not in hf
    before = Calibration(f"file:{txt}", 2, 8).key
    assert before.startswith("file-notes-") and before.endswith("-2x8-s0")
    txt.write_text("edited\n\nagain", encoding="utf-8")
    assert Calibration(f"file:{txt}", 2, 8).key != before


def test_file_sources_txt_and_jsonl(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\n  second doc \n", encoding="utf-8")
    rows = [{"text": f"t{i}", "q": f"q{i}", "a": f"a{i}"} for i in range(5)]
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cal = parse_calibration("file:a.txt")
    assert cal.source == f"file:{tmp_path / 'a.txt'}"
    assert sorted(cal.texts()) == ["first doc\nstill first", "second doc"]
    assert sorted(parse_calibration("file:b.jsonl").texts()) == [f"t{i}" for i in range(5)]
    assert sorted(parse_calibration("file:b.jsonl#q").texts()) == [f"q{i}" for i in range(5)]
    assert sorted(parse_calibration("file:b.jsonl#{q} -> {a}").texts())[0] == "q0 -> a0"
    with pytest.raises(ValueError, match="no column 'missing'"):
        list(parse_calibration("file:b.jsonl#missing").texts())
    with pytest.raises(ValueError, match=r"existing \.txt or \.jsonl"):
        parse_calibration("file:nowhere.txt")
    with pytest.raises(ValueError, match=r"\.jsonl files only"):
        parse_calibration("file:a.txt#text")


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A folder of local dataset-repository copies, found through MOEBENCH_DATA_DIR."""
    import datasets

    monkeypatch.setenv("MOEBENCH_DATA_DIR", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "hub"


def write_repo(root, files: dict[str, list[dict]], configs: dict[str, str] | None = None) -> None:
    """Files of json rows (`.json.gz` or `.jsonl`), and a README declaring `configs` (name -> glob)."""
    for name, rows in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(root / name, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if configs:
        yaml = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {g}\n"
                       for c, g in configs.items())
        (root / "README.md").write_text(f"---\nconfigs:\n{yaml}---\n", encoding="utf-8")


def test_c4_through_datasets_streaming(tok, local_hub):
    docs = documents(40)
    rows = [{"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.org"} for d in docs]
    write_repo(local_hub / "allenai" / "c4", {"en/c4-train.00000-of-01024.json.gz": rows})
    cal = Calibration("c4", samples=2, seq_len=16, seed=0)
    first = list(cal.texts())
    assert sorted(first) == sorted(docs) and first != docs and first == list(cal.texts())
    assert first != list(Calibration("c4", 2, 16, seed=1).texts())
    assert cal.tokens(tok).shape == (2, 16)


def test_presets_read_their_fields(local_hub):
    write_repo(local_hub / "openai" / "gsm8k", {"main/train.jsonl": [{"question": "1+1?", "answer": "2"}]},
               {"main": "main/train.jsonl"})
    subjects = PRESETS["math"].configs
    write_repo(local_hub / "EleutherAI" / "hendrycks_math",
               {f"{s}/train.jsonl": [{"problem": s, "solution": "x", "level": "1", "type": s}] for s in subjects},
               {s: f"{s}/train.jsonl" for s in subjects})
    write_repo(local_hub / "theblackcat102" / "evol-codealpaca-v1",
               {"train.jsonl": [{"instruction": "Sort", "output": "sorted(x)"}]})
    lines = [" = Alpha = \n", "\n", " Alpha text . \n", " = = Part = = \n", " more \n", " = Beta = \n", " b \n"]
    write_repo(local_hub / "Salesforce" / "wikitext", {"raw2/train.jsonl": [{"text": t} for t in lines]},
               {"wikitext-2-raw-v1": "raw2/train.jsonl"})
    assert list(Calibration("gsm8k").texts()) == ["Question: 1+1?\nAnswer: 2"]
    assert sorted(Calibration("math").texts()) == sorted(f"Problem: {s}\nSolution: x" for s in subjects)
    assert list(Calibration("code").texts()) == ["Sort\n\nsorted(x)"]
    assert sorted(Calibration("wikitext2").texts()) == ["= Alpha = \n\n Alpha text . \n = = Part = = \n more",
                                                        "= Beta = \n b"]


def test_hf_spec_forms(local_hub):
    write_repo(local_hub / "me" / "qa", {"train.jsonl": [{"q": "why", "a": "because"}]})
    assert list(parse_calibration("hf:me/qa:train:Q: {q}\\nA: {a}").texts()) == ["Q: why\nA: because"]
    assert list(parse_calibration("hf:me/qa:train:a").texts()) == ["because"]
    with pytest.raises(ValueError, match="expected hf:<dataset>"):
        parse_calibration("hf:me/qa")


def test_offline_failure_names_source_and_fixes(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MOEBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(OSError) as info:
        next(Calibration("c4").texts())
    message = str(info.value)
    for part in ("'c4'", "'allenai/c4'", "offline mode is set", "go online", "MOEBENCH_DATA_DIR", "file:PATH"):
        assert part in message


def test_unknown_source_suggests_names():
    with pytest.raises(ValueError, match=r"did you mean 'c4'") as info:
        parse_calibration("c5")
    assert all(name in str(info.value) for name in KNOWN_SOURCES)
    with pytest.raises(ValueError, match=r"did you mean 'wikitext2'"):
        parse_calibration("wikitext-2")
    with pytest.raises(ValueError, match="samples=0 must be a whole number >= 1"):
        Calibration("c4", samples=0)


def test_too_few_tokens_names_the_numbers(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("alpha beta\n\ngamma", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"'file:{path}' holds \d+ tokens; 4 x 64 = 256 are needed"):
        Calibration(f"file:{path}", samples=4, seq_len=64).tokens(tok)


def test_testbed_sources(tok):
    data = pytest.importorskip("moebench.testbed.data", reason="the embedded testbed is not installed")
    if not hasattr(data, "calibration_texts"):
        pytest.skip("moebench.testbed.data has no calibration_texts(domain, n, seed)")
    from moebench.testbed.domains import DOMAINS

    mix = Calibration("testbed:mix", samples=3, seq_len=256, seed=0)
    assert mix.key == "testbed-mix-3x256-s0"
    assert list(islice(mix.texts(), 64)) == data.calibration_texts("mix", 64, 0)
    assert mix.tokens(tok).shape == (3, 256)
    assert Calibration(f"testbed:{DOMAINS[0]}", 1, 16).tokens(tok).shape == (1, 16)
    with pytest.raises(ValueError, match=f"did you mean 'testbed:{DOMAINS[0]}'"):
        parse_calibration(f"testbed:{DOMAINS[0][:-1]}x")
