"""`moebench demo` as a user runs it (a smaller study through --spec), and the findings' numbers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/cli/ -> the repository


def mini_spec(tmp_path) -> str:
    """Six cells on testbed-8e: unpruned, frequency, REAP, NAEE with and without skipping and PreMoE TAER at 75%."""
    spec = {"name": "mini", "models": ["testbed-8e"],
            "methods": ["frequency", "reap", "naee", {"name": "naee", "skip": "naee"},
                        {"name": "premoe_taer", "calibration": ["testbed:domains"]}],
            "ratios": [0.75], "calibration": ["testbed:mix"], "tasks": ["testbed_logic_quick"],
            "calib_samples": 8, "calib_seq_len": 64, "lm_eval": {"batch_size": 64},
            "measure": {"batch": 1, "prompt_len": 16, "new_tokens": 4, "reps": 1, "warmup": 0,
                        "latency_lengths": [16, 64]},
            "stats_dir": str(tmp_path / "stats"), "executor": {"kind": "local", "parallel": 1}}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_demo_command_runs_a_study_to_report_leaderboard_and_findings(tmp_path):
    # as `make demo` runs it: no folders given, so a fresh folder of its own, never ./results
    results, reports = tmp_path / "demo-run" / "results", tmp_path / "demo-run" / "reports"
    cmd = [sys.executable, "-m", "moebench.cli", "demo", "--spec", mini_spec(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    root = os.path.join("demo-run", "results", "mini")
    assert lines[0] == f"moebench demo: 6 cells on testbed-8e -> {root} (a fresh run)"
    assert "grid: 6 cells run now, 0 already done, 0 failed" in out.stdout
    assert re.fullmatch(r"elapsed: (\d+ min \d\d|\d+) s", lines[-1]), lines[-1]
    assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()
    folder = reports / "mini"
    assert (folder / "report.pdf").stat().st_size > 10_000 and (reports / "leaderboard.html").exists()
    for figure in ("accuracy_vs_ratio", "latency_vs_input", "kept_experts_testbed-8e_premoe-taer"):
        assert (folder / "figures" / f"{figure}.pdf").exists(), figure
    if shutil.which("pdffonts"):
        fonts = subprocess.run(["pdffonts", str(folder / "report.pdf")], capture_output=True, text=True).stdout
        assert "Type 3" not in fonts and "TrueType" in fonts

    # results name this installation's model and task files portably, not by their absolute paths
    import moebench

    install = os.path.dirname(os.path.dirname(os.path.abspath(moebench.__file__)))
    for path in results.glob("mini/cells/*/*.json"):
        assert install not in path.read_text(), path
    assert "<moebench>/testbed/models/testbed-8e" in next(results.glob("mini/cells/*/cell.json")).read_text()

    # the findings state the measured accuracies of the tables (percent, with stderr), whichever way they come
    # out, and compare them paired over the items both cells ran (the cells wrote items.csv.gz)
    runs = pd.read_csv(results / "mini" / "tables" / "runs.csv")
    scores = pd.read_csv(results / "mini" / "tables" / "scores.csv")
    acc = scores[(scores["metric"] == "acc") & (scores["task"] == "testbed_logic_quick")].set_index("cell")["value"]
    cells = {(r.method, r.skip): r.cell for r in runs.itertuples() if r.ratio == 0.75}
    by_method = {k: acc[c] for k, c in cells.items()}
    findings = (folder / "findings.md").read_text()
    f5 = next(line for line in findings.splitlines() if line.startswith("- F5"))
    assert f"premoe_taer {100 * by_method[('premoe_taer', 'none')]:.1f} \u00b1 " in f5 and "prep n/a" in f5
    best = min(("frequency", "reap"), key=lambda m: (-by_method[(m, "none")], cells[(m, "none")]))  # F5's order
    assert f"{100 * by_method[(best, 'none')]:.1f} \u00b1 " in f5.split("best static")[1]
    from moebench.grid.items import read_items

    a, b = (read_items(str(results / "mini" / "cells" / cells[(m, "none")])) for m in ("premoe_taer", best))
    d = a["value"].to_numpy() - b["value"].to_numpy()  # same items in the same order (sorted by doc_id)
    assert (a["doc_hash"].to_numpy() == b["doc_hash"].to_numpy()).all() and len(d) == 150
    se = d.std(ddof=1) / len(d) ** 0.5
    verdict = "tie" if abs(d.mean()) <= 1.96 * se else ("yes" if d.mean() > 0 else "no")
    assert f"-> {verdict} ({100 * d.mean():+.1f} \u00b1 {100 * se:.1f} points, paired over 150 items" in f5, f5
    f3 = next(line for line in findings.splitlines() if line.startswith("- F3"))
    rate = runs[(runs["method"] == "naee") & (runs["skip"] == "naee")]["skip_rate"].iloc[0]
    assert 0 < rate < 1
    plain, skipped = 100 * by_method[("naee", "none")], 100 * by_method[("naee", "naee")]
    skip_row = runs[(runs["method"] == "naee") & (runs["skip"] == "naee")].iloc[0]  # its own paired ratio
    speed = (rf"x{skip_row['skip_decode_speedup']:.2f}, 95% interval {skip_row['skip_decode_speedup_lo']:.2f}-"
             rf"{skip_row['skip_decode_speedup_hi']:.2f}")
    assert re.search(rf"naee 75%: accuracy {plain:.1f} \u00b1 [\d.]+% -> {skipped:.1f} \u00b1 [\d.]+% \(change: "
                     r"(yes|no|tie) \([^)]*paired over 150 items[^)]*\)\), decode speed(: no measurable change \("
                     rf"{speed}\)| (faster|slower) \({speed}\)| {speed}: no verdict \([^)]*\)), "
                     rf"skip rate {rate:.3f} of routed pairs", f3), f3
    assert "F2 (domain vs generic calibration): not measured" in findings  # no domain-calibrated cell here

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)  # resumable
    assert again.returncode == 0 and "grid: 0 cells run now, 6 already done, 0 failed" in again.stdout
    first = again.stdout.splitlines()[0]  # says plainly, first, that nothing new runs and how to run it again
    assert "6 of 6 cells are already finished there" in first and "reused" in first and "remove" in first


def test_demo_rejects_a_missing_spec_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moebench.cli", "demo", "--spec", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "nope.yaml" in out.stderr and "is not a file" in out.stderr


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "results", "demo", "tables", "runs.csv")),
                    reason="the demo's results are not committed")
def test_committed_findings_match_the_committed_tables():
    from moebench.report.findings import findings
    from moebench.report.tables import load_studies

    (study,) = load_studies(os.path.join(ROOT, "results", "demo"))
    with open(os.path.join(ROOT, "reports", "demo", "findings.md")) as f:
        committed = [line[2:] for line in f.read().splitlines() if line.startswith("- ")]
    assert committed == findings(study)
