"""`moebench grid run` with its output redirected to a file, as a batch job runs it: a quiet log,
one calibration shared with the cells, and a readable index of the hash-named cell folders."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml

BIN = os.path.dirname(sys.executable)


@pytest.mark.slow
def test_grid_log_is_quiet_and_cells_are_indexed(tmp_path):
    stats = tmp_path / "stats"
    spec = {"name": "quiet", "models": ["testbed-8e"], "methods": ["reap"], "ratios": [0.5],
            "calibration": ["testbed:mix"], "tasks": ["testbed_logic_quick"], "calib_samples": 8,
            "calib_seq_len": 64, "lm_eval": {"batch_size": 16, "limit": 8}, "measure": False,
            "stats_dir": str(stats), "executor": {"kind": "local", "parallel": 1}}
    path = tmp_path / "quiet.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp_path / "grid.log"
    with open(log, "w") as out:
        rc = subprocess.run([os.path.join(BIN, "moebench"), "grid", "run", str(path), "--results",
                             str(tmp_path / "results")], stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900).returncode
    text = log.read_text()
    assert rc == 0, text[-3000:]

    # no per-tensor or per-batch bars; the calibration says what it does in two lines; the grid's bar stays
    assert "Loading weights" not in text and "Writing model shards" not in text
    assert [line for line in text.splitlines() if "calibration" in line] == [
        line for line in text.splitlines() if line.startswith(("calibration: ", "calibration 1 of 1: "))]
    assert len([line for line in text.splitlines() if line.startswith("calibration: ")]) == 2
    assert [line for line in text.splitlines() if line.startswith("calibration 1 of ")] == [
        "calibration 1 of 1: testbed-8e on testbed:mix (norms)"]  # the grid's one pass, named
    assert "batch/s" not in text
    assert "2/2" in text and "cell" in text  # the grid bar: 2 cells (the unpruned one and reap)

    # the cells found what the grid calibrated: one statistics folder, and no cell collected anything
    assert [p.name.split("-")[0:2] for p in stats.iterdir()] == [["testbed", "8e"]]
    root = tmp_path / "results" / "quiet"
    for cell_log in root.glob("cells/*/logs/stderr.log"):
        cell_text = cell_log.read_text()
        assert "calibration:" not in cell_text and "Loading weights" not in cell_text, cell_log

    with open(root / "cells" / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["ratio"], r["calib"], r["skip"], r["state"]) for r in rows) == [
        ("none", "0", "", "none", "done"), ("reap", "0.5", "testbed:mix", "none", "done")]
    assert {r["cell"] for r in rows} == {p.name for p in (root / "cells").iterdir() if p.is_dir()}
    assert {r["model"] for r in rows} == {"testbed-8e"}
