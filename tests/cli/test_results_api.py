"""What a new user meets after a run: `moebench --version`, the results table, results as DataFrames."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import moebench
import moebench.results
from moebench.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "results", "demo")


def test_version_names_moebench_and_its_stack():
    done = subprocess.run([sys.executable, "-m", "moebench.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    line = done.stdout.strip()
    assert line.startswith(f"moebench {moebench.__version__} (torch ") and "transformers 5." in line
    assert "lm-eval" in line and "\n" not in line


def test_results_load_gives_the_reports_tables_as_dataframes():
    res = moebench.results.load(DEMO)
    assert res.name == "demo" and isinstance(res.runs, pd.DataFrame) and isinstance(res.scores, pd.DataFrame)
    table = res.summary()
    assert len(table) == len(res.runs) == 69
    unpruned = table[table["baseline"]]
    assert len(unpruned) == 1 and unpruned["recovery"].iloc[0] == pytest.approx(100.0)
    # the average accuracy is the mean of the tasks' accuracies, as the report defines it
    cell = table.iloc[5]["cell"]
    acc = res.scores[(res.scores.cell == cell) & (res.scores.metric == "acc") & (res.scores["filter"] == "none")]
    assert table.iloc[5]["accuracy"] == pytest.approx(acc["value"].mean())
    text = moebench.results.results_table(table, limit=5)
    assert "accuracy" in text and "decode speedup" in text and "... and 64 more rows" in text


def test_collect_ends_with_the_results_table(tmp_path, capsys):
    shutil.copytree(DEMO, tmp_path / "demo", ignore=shutil.ignore_patterns("LOCK"))
    assert main(["collect", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "demo: 69 cells" in out and "testbed-8e  unpruned" in out and "± " in out
    with pytest.raises(ValueError, match="no study 'other'"):
        moebench.results.load(str(tmp_path / "demo"), study="other")


def test_prune_and_calibrate_say_where_the_statistics_are_and_whether_they_were_cached(saved_models, corpus,
                                                                                     tmp_path, capsys):
    common = [saved_models("qwen3_moe"), "--calib", f"file:{corpus}", "--samples", "4", "--seq-len", "16",
              "--device", "cpu", "--stats-dir", str(tmp_path / "stats")]
    assert main(["calibrate", *common, "--groups", "routing,norms,logits"]) == 0
    first = capsys.readouterr().err
    assert "collected and cached in " + str(tmp_path / "stats") in first
    assert main(["prune", *common, "--method", "frequency", "--ratio", "0.5", "--out", str(tmp_path / "o")]) == 0
    second = capsys.readouterr().err
    assert "read from the cache " + str(tmp_path / "stats") in second and "collected" not in second
