"""Uncertainty in reports and findings: stderr of averages, paired tests on per-item results, speed spread,
and the leaderboard's separate section for variants that free nothing."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from report_data import TASKS, cell, write_study

from moebench.cli import main
from moebench.report.findings import _acc, _fmt, _verdict, f3, with_estimates
from moebench.report.tables import MetricSpec, load_studies, summary
from moebench.report.uncertainty import Z95, difference, estimate

N = 150


def _items(right: int, flips: int = 0) -> dict[str, list[int]]:
    """``right`` of N items correct in every task; the first ``flips`` of the correct ones turned wrong."""
    base = [1] * right + [0] * (N - right)
    return {t: [0 if i < flips else v for i, v in enumerate(base)] for t in TASKS}


def _study(tmp_path, with_items: bool = True):
    """frequency right on 90/150 items per task; reap on the same items less the first 10 of them."""
    cells = [cell("base", "none", 0.0, 0.9, items=_items(135) if with_items else None),
             cell("freq", "frequency", 0.5, 0.6, items=_items(90) if with_items else None),
             cell("reap", "reap", 0.5, 80 / N, items=_items(90, flips=10) if with_items else None)]
    if not with_items:  # same accuracies as the per-item version
        cells[0]["acc"], cells[1]["acc"] = 135 / N, 90 / N
    return load_studies(write_study(str(tmp_path), cells))[0]


def test_paired_difference_is_computed_from_items_and_resolves_what_stderrs_cannot(tmp_path):
    study = _study(tmp_path)
    spec = MetricSpec()
    table = summary(study, spec)
    freq, reap = (estimate(study, table, [c], spec) for c in ("freq", "reap"))
    diff = difference(freq, reap)
    # d = 1 on 10 of 150 items per task, 0 elsewhere: mean 1/15, sample variance p(1-p) N/(N-1)
    p = 10 / N
    se = math.sqrt(2 * p * (1 - p) * N / (N - 1) / N) / 2
    assert diff.test == "paired" and diff.n_items == 2 * N
    assert diff.points == pytest.approx(100 * p) and diff.stderr == pytest.approx(100 * se)
    assert not diff.tie and abs(diff.points) > Z95 * diff.stderr
    # the same accuracies without per-item results: stderrs only, the difference is inside them
    plain = _study(tmp_path / "plain", with_items=False)
    ptable = summary(plain, spec)
    loose = difference(*(estimate(plain, ptable, [c], spec) for c in ("freq", "reap")))
    assert loose.test == "stderr" and loose.points == pytest.approx(diff.points)
    se_avg = [math.sqrt(sum(v * (1 - v) / (N - 1) for v in (a, a)) ) / 2 for a in (0.6, 80 / N)]
    assert loose.stderr == pytest.approx(100 * math.hypot(*se_avg)) and loose.tie


def test_findings_helpers_say_tie_only_inside_the_interval_and_name_the_test(tmp_path):
    spec = MetricSpec()
    for with_items, word, test in ((True, "yes", "paired over 300 items"), (False, "tie", "stderr-based")):
        study = _study(tmp_path / str(with_items), with_items)
        table = with_estimates(summary(study, spec), study, spec)
        freq, reap = _acc(table, "frequency", 0.5), _acc(table, "reap", 0.5)
        assert _fmt(freq) == f"60.0 \u00b1 {100 * freq.estimate.stderr:.1f}%"
        verdict = _verdict(freq, reap)
        assert verdict.startswith(f"{word} (+6.7 \u00b1") and test in verdict, verdict
        assert ("inside its 95% interval" in verdict) == (word == "tie")
    assert _verdict(0.5, 0.5) == "tie" and _verdict(0.6, 0.5) == "yes" and _verdict(None, 0.5) == "not measured"
    assert _fmt(0.5) == "50.0%" and _fmt(None) == "n/a"


def test_speed_findings_call_a_change_only_outside_the_paired_interval_and_never_on_flagged_cells(tmp_path):
    cells = [cell("base", "none", 0.0, 0.9),
             cell("plain", "naee", 0.5, 0.6),
             cell("skip", "naee", 0.5, 0.6, skip="naee", skip_speedup=(0.98, 0.95, 1.02)),
             cell("plain75", "naee", 0.75, 0.5),
             cell("skip75", "naee", 0.75, 0.5, skip="naee", skip_speedup=(0.60, 0.55, 0.64)),
             cell("plain25", "naee", 0.25, 0.7),
             cell("skip25", "naee", 0.25, 0.7, skip="naee", skip_speedup=(1.30, 1.20, 1.40), under_load=True),
             cell("plain0", "naee", 0.1, 0.8),
             cell("skip0", "naee", 0.1, 0.8, skip="naee", skip_speedup=(1.30, 1.20, 1.40), pairing="sequential")]
    study = load_studies(write_study(str(tmp_path), cells))[0]
    text = f3(summary(study, MetricSpec()), study.runs)
    assert "naee 50%" in text and "decode speed: no measurable change (x0.98, 95% interval 0.95-1.02)" in text
    assert "decode speed slower (x0.60, 95% interval 0.55-0.64)" in text
    # the same clear speedup, measured under load or unpaired: the figure, but no verdict
    assert "naee 25%" in text and "decode speed x1.30, 95% interval 1.20-1.40: no verdict (under load" in text
    assert "naee 10%" in text and "decode speed x1.30, 95% interval 1.20-1.40: no verdict (unpaired" in text
    assert "faster" not in text
    # cells from before paired timing: no speedup, said so
    old = load_studies(write_study(str(tmp_path / "old"), [{**c, "speedup": (None, None, None)} for c in cells]))[0]
    table = summary(old, MetricSpec())
    assert table["decode_speedup"].isna().all()


def test_report_and_leaderboard_show_stderr_and_rank_input_aware_rows_apart(tmp_path):
    cells = [cell("base", "none", 0.0, 0.9), cell("freq", "frequency", 0.25, 0.8),
             cell("taer", "premoe_taer", 0.25, 0.88, calib="testbed:domains", kind="select"),
             cell("mask", "reap", 0.25, 0.85, apply="mask")]
    folder = write_study(str(tmp_path / "results"), cells)
    out = tmp_path / "reports"
    assert main(["report", folder, "--out", str(out)]) == 0
    assert main(["leaderboard", str(tmp_path / "results"), "--out", str(out)]) == 0
    report = (out / "unc" / "report.md").read_text()
    se = math.sqrt(2 * 0.8 * 0.2 / (N - 1)) / 2
    assert f"| 80.00 \u00b1 {100 * se:.2f} |" in report and "avg acc \u00b1 stderr (%)" in report
    board = (out / "leaderboard.md").read_text()
    pruned, resident = board.split("## Input-aware and masked: every expert stays in memory")
    assert "| frequency |" in pruned and "| unpruned |" in pruned
    assert "premoe_taer" not in pruned and "| reap |" not in pruned
    assert "| premoe_taer |" in resident and "| reap |" in resident
    rows = [line for line in resident.splitlines() if line.startswith("| unc |")]
    assert all("| 9.00 |" in line for line in rows), rows  # resident weights: nothing freed (9 MB of 9 MB)
    page = (out / "leaderboard.html").read_text()
    assert page.count("<table>") == 2 and "every expert stays in memory" in page


def test_calibration_effect_rows_carry_the_stderr_of_the_difference(tmp_path):
    cells = [cell("base", "none", 0.0, 0.9), cell("mix", "reap", 0.5, 0.5),
             cell("dom", "reap", 0.5, 0.7, calib="t:alpha")]
    study = load_studies(write_study(str(tmp_path), cells))[0]
    from moebench.report.domains import calibration_effect

    effect = calibration_effect(study, summary(study, MetricSpec()), MetricSpec(), {"t:alpha": ["t_alpha"]})
    (row,) = effect.itertuples()
    assert row.delta == pytest.approx(20.0) and row.delta_test == "stderr"
    assert row.delta_stderr == pytest.approx(100 * math.hypot(*(math.sqrt(v * (1 - v) / (N - 1)) for v in (0.5, 0.7))))
    assert os.path.exists(Path(study.cell_dirs["dom"]) / "plan.json")
