"""The statistics cache trusts nothing it reads: broken files are named and collected again; a full
disk is an error naming the folder and leaves nothing behind; bad calibration input is refused up front."""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch
from conftest import build_tokenizer, fill_disk
from tiny_models import tiny_model

import moebench.calib.cache as stats_cache
from moebench.calib.cache import StatsCacheWarning, group_problem
from moebench.cli import main
from moebench.method.pipeline import PlanRequest, make_plan
from moebench.moe.view import MoEView


@pytest.fixture
def passes(monkeypatch):
    """The statistic groups of every real collection pass."""
    calls = []
    real = stats_cache.collect
    monkeypatch.setattr(stats_cache, "collect",
                        lambda m, t, g, *a, **k: calls.append(sorted(g)) or real(m, t, g, *a, **k))
    return calls


def calibrate(model: str, corpus: str, stats: str, *extra: str) -> int:
    return main(["calibrate", model, "--calib", f"file:{corpus}", "--samples", "4", "--seq-len", "16",
                 "--stats-dir", stats, "--groups", "routing", *extra])


def cache_file(stats: str, group: str = "routing") -> str:
    (path,) = glob.glob(os.path.join(stats, "**", f"{group}.pt"), recursive=True)
    return path


def test_truncated_file_is_named_and_collected_again(saved_models, corpus, tmp_path, passes):
    stats = str(tmp_path / "stats")
    assert calibrate(saved_models("mixtral"), corpus, stats) == 0
    path = cache_file(stats)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.warns(StatsCacheWarning, match=f"statistics cache file {re.escape(path)}: it cannot be read"):
        assert calibrate(saved_models("mixtral"), corpus, stats) == 0
    assert len(passes) == 2 and os.path.getsize(path) == size  # collected again, written whole
    view = MoEView(tiny_model("mixtral"))
    assert group_problem(torch.load(path, weights_only=True), "routing", view) is None


def corrupt(path: str, change) -> None:
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)


@pytest.mark.parametrize("change, problem", [
    (lambda d: d["layers"][0]["counts"].__setitem__(0, float("nan")), "counts holds 1 non-finite values"),
    (lambda d: d["layers"][1].__setitem__("counts", torch.zeros(7, dtype=torch.float64)), "not 8 experts"),
    (lambda d: d["layers"].pop(1), r"it holds layers \[0\], the model's MoE layers are \[0, 1\]"),
    (lambda d: d.__setitem__("format", 1), "format 1 of group 'routing'; expected format 2"),
    (lambda d: d.update(d.pop("layers")) or d.pop("format"), "no format version"),  # the layout of format 1
])
def test_wrong_contents_are_named_and_the_plan_comes_from_fresh_statistics(corpus, tmp_path, passes, change,
                                                                         problem):
    model, tok = tiny_model("mixtral"), build_tokenizer()
    request = PlanRequest(method="frequency", ratio=0.5, calib=f"file:{corpus}", calib_samples=4, calib_seq_len=16,
                          stats_dir=str(tmp_path / "stats"), model_id="tiny")
    clean = make_plan(model, tok, request, progress=False)
    path = cache_file(str(tmp_path / "stats"))
    corrupt(path, change)
    with pytest.warns(StatsCacheWarning, match=f"{re.escape(path)}: .*{problem}.*collecting the routing statistics"):
        again = make_plan(model, tok, request, progress=False)
    assert again.keep == clean.keep and len(passes) == 2
    assert group_problem(torch.load(path, weights_only=True), "routing", MoEView(model)) is None


def test_full_disk_names_the_folder_and_leaves_no_files(saved_models, corpus, small_disk, capsys):
    fill_disk(small_disk, leave=4096)
    stats = str(small_disk / "stats")
    assert calibrate(saved_models("mixtral"), corpus, stats) == 2
    err = capsys.readouterr().err
    assert "moebench calibrate: error: [Errno 28] no space left on the device holding" in err
    assert str(small_disk) in err and "enforce fail" not in err
    assert "free space there and run again" in err
    left = [os.path.join(d, f) for d, _, files in os.walk(small_disk) for f in files]
    assert left == [str(small_disk / "filler")]  # no statistics file, no temporary file


@pytest.mark.parametrize("content, problem", [
    (b"w1 w2\x00\x01\x02\xff", r"is binary \(it holds NUL bytes at offset 5\)"),
    ("caf\u00e9 w1 w2".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset 3\)"),
])
def test_binary_or_non_utf8_calibration_file_is_named(saved_models, tmp_path, capsys, content, problem):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    assert main(["calibrate", saved_models("mixtral"), "--calib", f"file:{path}", "--stats-dir",
                 str(tmp_path / "stats")]) == 2
    err = capsys.readouterr().err
    assert f"calibration file '{path}' " in err and re.search(problem, err)
    assert not os.path.exists(tmp_path / "stats")


def test_bad_jsonl_line_is_named(tmp_path):
    from moebench.calib.sources import parse_calibration

    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "w1 w2"}\nnot json\n')
    with pytest.raises(ValueError, match=f"file:{path} line 2 is not JSON"):
        list(parse_calibration(f"file:{path}").texts())


@pytest.mark.parametrize("args, problem", [
    (["--samples", "100000000"], "--samples x --seq-len = 100,000,000 x 2,048 = 204,800,000,000 calibration tokens"),
    (["--samples", "0"], "--samples=0 must be a whole number >= 1"),
    (["--samples", "8", "--seq-len", "-5"], "--seq-len=-5 must be a whole number >= 1"),
])
def test_calibration_size_is_checked_before_the_model_is_loaded(tmp_path, capsys, args, problem):
    missing = str(tmp_path / "no-such-model")  # loading it would fail with another error
    assert main(["calibrate", missing, "--calib", "testbed:mix", *args]) == 2
    err = capsys.readouterr().err
    assert problem in err and "no model folder" not in err
