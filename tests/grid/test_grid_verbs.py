"""`grid status` in spec terms without heavy imports, and the run verbs: --dry-run, --only, --retry-failed, --force."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from test_grid import make_study

from moebench.cli import main
from moebench.grid.guard import release, try_lock
from moebench.grid.index import mark
from moebench.grid.runner import cell_dir, status, study_root
from moebench.grid.spec import load_study

pytestmark = pytest.mark.slow  # runs cells, one subprocess each

PROBE = ("import sys; from moebench.cli import main; rc = main(sys.argv[1:]); "
         "print('HEAVY', sorted(m for m in ('torch', 'lm_eval', 'transformers', 'pandas') if m in sys.modules)); "
         "sys.exit(rc)")


def status_in_fresh_process(spec: str, results: str, *extra: str) -> str:
    """`moebench grid status` in a new interpreter; its output ends with the heavy modules it imported."""
    out = subprocess.run([sys.executable, "-c", PROBE, "grid", "status", spec, "--results", results, *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def folder_of(spec: str, results: str, method: str, ratio: float) -> str:
    study = load_study(spec)
    (cell,) = [c for c in study.cells if c.method == method and c.ratio == ratio]
    return cell_dir(study_root(results, study), cell)


def index_states(results: str) -> dict[str, str]:
    with open(os.path.join(results, "tiny", "cells", "index.csv"), newline="") as f:
        return {(row["method"], row["ratio"]): row["state"] for row in csv.DictReader(f)}


def test_grid_verbs_and_status_in_spec_terms(tmp_path, saved_models, capsys):
    spec = make_study(tmp_path, saved_models("mixtral"), ratios=[0.25, 0.5])
    results = str(tmp_path / "results")
    calib = load_study(spec).cells[0].calib

    # --dry-run: the cells and the one calibration pass, nothing written
    assert main(["grid", "run", spec, "--results", results, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would run 4 of 4 cells" in out and "nothing is written" in out
    assert f"calibration 1 of 1: {load_study(spec).cells[0].model} on {calib}: norms, routing" in out
    assert f"run  reap ratio 0.25 calib {calib}" in out and "[pending; cells/" in out
    assert not os.path.exists(results)

    # a filter naming an unknown key or matching nothing is refused, naming what there is
    assert main(["grid", "run", spec, "--results", results, "--only", "methd=reap"]) == 2
    assert "did you mean 'method'" in capsys.readouterr().err
    assert main(["grid", "run", spec, "--results", results, "--only", "method=merge"]) == 2
    assert "matches no cell" in (err := capsys.readouterr().err) and "frequency, reap" in err

    # --only: the frequency cells run, the reap cells are left pending
    assert main(["grid", "run", spec, "--results", results, "--only", "method=frequency"]) == 0
    out = capsys.readouterr().out
    assert "2 done now, 0 already done, 0 failed, 0 running elsewhere, 2 not selected" in out
    assert f"calibration 1 of 1: {load_study(spec).cells[0].model} on {calib} (routing)" in out  # the selected cells
    assert index_states(results) == {("frequency", "0.25"): "done", ("frequency", "0.5"): "done",
                                     ("reap", "0.25"): "pending", ("reap", "0.5"): "pending"}

    # status from the study folder: spec terms, no torch / lm-eval / transformers / pandas imported
    out = status_in_fresh_process(spec, results)
    assert "tiny: 4 cells: 2 done, 0 running, 0 failed, 0 broken, 2 pending" in out
    assert "by method: frequency 2/2 · reap 0/2" in out
    assert f"pending  reap ratio 0.25 calib {calib}" in out and "expanded from the spec" not in out
    assert "HEAVY []" in out

    # a failed cell is named with its exception; a cell this machine runs says here and its pid
    failed = folder_of(spec, results, "reap", 0.25)
    with open(os.path.join(failed, "failure.json"), "w") as f:
        json.dump({"traceback": "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n"}, f)
    running = folder_of(spec, results, "reap", 0.5)
    lock = try_lock(running)
    try:
        assert mark(running, "running")  # what a cell process does when it starts
        assert index_states(results)[("reap", "0.5")] == "running"
        out = status_in_fresh_process(spec, results, "--only", "method=reap")
    finally:
        release(lock)
    assert "tiny: 2 cells: 0 done, 1 running, 1 failed, 0 broken, 0 pending" in out
    assert f"failed   reap ratio 0.25 calib {calib}" in out and "RuntimeError: out of memory" in out
    assert f"running  reap ratio 0.5 calib {calib}" in out and f"here, pid {os.getpid()} since" in out
    assert "elsewhere" not in out

    # --retry-failed: only the failed cell runs, the pending one stays
    assert main(["grid", "run", spec, "--results", results, "--retry-failed"]) == 0
    assert "1 done now, 2 already done, 0 failed, 0 running elsewhere, 1 not selected" in capsys.readouterr().out
    assert {os.path.basename(f) for f in status(load_study(spec), study_root(results, load_study(spec)))["done"]} \
        == {os.path.basename(folder_of(spec, results, m, r))
            for m, r in (("frequency", 0.25), ("frequency", 0.5), ("reap", 0.25))}

    # --force: a finished cell runs again (a new cell.json), only it with --only
    forced = folder_of(spec, results, "frequency", 0.5)
    before = os.stat(os.path.join(forced, "cell.json")).st_mtime_ns
    assert main(["grid", "run", spec, "--results", results, "--dry-run", "--force", "method=frequency,ratio=0.5",
                 "--only", "method=frequency"]) == 0
    assert "would run 1 of 4 cells" in (out := capsys.readouterr().out) and "[forced; cells/" in out
    assert main(["grid", "run", spec, "--results", results, "--force", "method=frequency,ratio=0.5",
                 "--only", "method=frequency"]) == 0
    out = capsys.readouterr().out
    assert "1 done now, 2 already done, 0 failed, 0 running elsewhere, 1 not selected" in out
    assert "forced: frequency ratio 0.5" in out
    assert os.stat(os.path.join(forced, "cell.json")).st_mtime_ns != before
    assert index_states(results)[("reap", "0.5")] == "pending"

    # an edited spec is no longer what the folder was prepared from: status expands it and says so
    with open(spec) as f:
        text = f.read()
    with open(spec, "w") as f:
        f.write(text.replace("0.25", "0.3"))
    out = status_in_fresh_process(spec, results)
    assert "expanded from the spec" in out and "tiny: 4 cells: 1 done" in out


def test_a_finished_cell_whose_method_defaults_changed_runs_again(tmp_path, saved_models, capsys):
    """A cell's id hashes the spec as written; when a method's default changes, its finished cells would answer
    another question. `grid run` finds them by their plan's recorded parameters and runs them again."""
    from moebench.grid.runner import dry_run

    cli = main
    spec = make_study(tmp_path, saved_models("mixtral"), methods=["frequency", "random"], ratios=[0.5])
    assert cli(["grid", "run", spec, "--results", str(tmp_path / "results")]) == 0
    root = tmp_path / "results" / "tiny"
    study = load_study(spec)
    random_cell = next(c for c in study.cells if c.method == "random")
    plan = root / "cells" / random_cell.id / "plan.json"
    data = json.loads(plan.read_text())
    data["params"]["seed"] = 7  # as if the default seed had been 7 when it ran
    plan.write_text(json.dumps(data))
    capsys.readouterr()
    assert "would run 1 of 2 cells" in dry_run(study, str(root)) and "[stale;" in dry_run(study, str(root))
    # as the folder reads after an upgrade (prepared by another moebench): status expands the spec and counts the
    # stale cell as pending, with why
    prepared = json.loads((root / "study.json").read_text())
    (root / "study.json").write_text(json.dumps({**prepared, "moebench_version": "0.0.1"}))
    assert cli(["grid", "status", spec, "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "tiny: 2 cells: 1 done, 0 running, 0 failed, 0 broken, 1 pending" in out, out
    assert "by method: frequency 1/1 · random 0/1" in out, out
    assert ("pending  random ratio 0.5" in out
            and "finished, but stale: method parameters changed since it ran: seed 7 -> 0" in out), out
    assert cli(["grid", "run", spec, "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "1 done now, 1 already done" in out
    assert "stale: random" in out and "method parameters changed since it ran: seed 7 -> 0" in out
    assert json.loads(plan.read_text())["params"]["seed"] == 0
