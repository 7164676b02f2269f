"""Recovered cells (trained after pruning, ``recover`` in the runs table) in the report: the summary names the
recovery kind, F1-F6 and the other selections by method leave them out, F7 compares each with its twin,
the before/after figure, and the leaderboard and report say what ``+lora`` means."""

from __future__ import annotations

import math
import os

import matplotlib.colors as mcolors
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from report_data import cell, correct, recovered_study, write_study

from moebench.cli import main
from moebench.report import facets, maps, style
from moebench.report import figures as F
from moebench.report.findings import _acc, f1, f3, f5, f7, findings, with_estimates
from moebench.report.leaderboard import write_leaderboard
from moebench.report.published import load_published, matches
from moebench.report.tables import MetricSpec, load_studies, summary, twins
from moebench.report.uncertainty import Z95

N = 100  # items per task; two tasks (t_alpha, t_beta)


def _se(p: float) -> float:
    """Stderr (points) of a cell right on a share ``p`` of the items of both tasks: the tasks' lm-eval stderr
    sqrt(p (1 - p) / (n - 1)), combined as sqrt(2 se^2) / 2."""
    return 100 * math.sqrt(2 * p * (1 - p) / (N - 1)) / 2


def _paired_se(k: int) -> float:
    """Paired stderr (points) of a difference of ``k`` items per task (nested correct sets: d is 1 on k items, 0
    on the rest): sqrt(sum over the two tasks of var(d) / n) / 2, var with ddof 1."""
    var = (k / N) * (1 - k / N) * N / (N - 1)
    return 100 * math.sqrt(2 * var / N) / 2


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return load_studies(recovered_study(str(tmp_path_factory.mktemp("recovered"))))[0]


@pytest.fixture(scope="module")
def table(study):
    return with_estimates(summary(study, MetricSpec()), study, MetricSpec())


def test_summary_names_the_recovery_kind_and_labels_recovered_cells(study, table, tmp_path):
    rows = table.set_index("cell")
    assert rows.loc["reap50l", ["method", "method_id", "recover"]].tolist() == ["reap+lora", "reap", "lora"]
    assert rows.loc["reap50", ["method", "method_id", "recover"]].tolist() == ["reap", "reap", ""]
    assert rows.loc["base", "recover"] == "" and bool(rows.loc["base", "baseline"])
    assert rows.loc["reap50l", "recovery"] == pytest.approx(100 * 0.70 / 0.90)
    assert (table["recover"] != "").sum() == 3
    assert twins(table) == {"reap50l": "reap50", "freq50l": "freq50", "ean50l": None}
    # tables from before recovery (no `recover` column): no recovered cell, labels as before
    old = os.path.join(study.source, "runs.csv")
    runs = pd.read_csv(old).drop(columns=["recover", "recover_s", "recover_loss_first", "recover_loss_last"])
    folder = recovered_study(str(tmp_path))
    runs.to_csv(os.path.join(folder, "tables", "runs.csv"), index=False)
    plain = summary(load_studies(folder)[0], MetricSpec())
    assert set(plain["recover"]) == {""} and "reap+lora" not in set(plain["method"])
    assert twins(plain) == {}


def test_earlier_findings_and_selections_leave_recovered_cells_out(table):
    reap = _acc(table, "reap", 0.5)
    assert reap == pytest.approx(0.40) and reap.estimate.cells == ("reap50",)  # not (0.40 + 0.70) / 2
    assert _acc(table, "frequency", 0.5).estimate.cells == ("freq50",)
    assert _acc(table, "ean", 0.5) is None  # ean ran only with recovery
    assert f"REAP {40.0:.1f} \u00b1 {_se(0.4):.1f}%, frequency {60.0:.1f} \u00b1 {_se(0.6):.1f}%" in f1(table)

    def rows(values):  # (cell, method_id, ratio, skip, recover, accuracy): a main table as findings read it
        return pd.DataFrame([{"cell": c, "method_id": m, "method": m + (f"+skip:{s}" if s != "none" else "")
                              + (f"+{r}" if r else ""), "ratio": q, "skip": s, "recover": r, "calib": "testbed:mix",
                              "accuracy": a} for c, m, q, s, r, a in values])

    # F3: the skip composite against the same pruning without skipping and without recovery (listed first here)
    skip = rows([("l", "naee", 0.5, "none", "lora", 0.8), ("p", "naee", 0.5, "none", "", 0.6),
                 ("k", "naee", 0.5, "naee", "", 0.5)])
    assert "naee 50%: accuracy 60.0% -> 50.0% (change: no (-10.0 points" in f3(skip)  # not 80.0% -> 50.0%
    # F5: a recovered static cell is not the best static one
    static = rows([("r", "reap", 0.75, "none", "", 0.3), ("rl", "reap", 0.75, "none", "lora", 0.9),
                   ("p", "prep", 0.75, "none", "", 0.5)])
    assert "best static reap 30.0% -> yes" in f5(static)
    # the skipping panel draws the same pruning without skipping beside its composite, not the recovered cell
    panel = skip.assign(model="m", baseline=False, facet=["static", "search", "skip"])
    (skip_panel,) = [p for p in facets.panels(panel) if p.facet == "skip"]
    assert skip_panel.labels() == ["naee", "naee+skip:naee"]
    # published numbers are one-shot: a recovered cell never matches a paper's setting
    entry = next(e for e in load_published() if e.method == "hc_smoe" and e.ratio == 0.5 and e.calibration == "c4")
    row = {"model": entry.model, "method_id": "hc_smoe", "skip": "none", "ratio": 0.5, "calib": "c4",
           "params": '{"linkage": "average"}', "recover": ""}
    assert matches(entry, row) and not matches(entry, {**row, "recover": "lora"})


def test_a_recovered_cell_keeps_its_twins_expert_map(table):
    uneven = {"keep": {"0": [0, 1, 2, 3, 4], "1": [0, 1, 2]}, "extra": {"n_experts": 8}}
    with style.figure_style():
        drawn = maps.kept_expert_maps({"reap50": uneven, "reap50l": uneven, "ean50l": uneven}, table)
        assert [f.name for f in drawn] == ["kept_experts_testbed-8e_ean-lora", "kept_experts_testbed-8e_reap"]
        for figure in drawn:
            style.close(figure.fig)


def test_f7_states_each_recovered_cell_against_its_twin(study, table):
    text = f7(table, study.runs)
    # reap: 40 -> 70 of 100 items per task, unpruned 90: (70 - 40) / (90 - 40) = 60% of the gap;
    # frequency: 60 -> 61, (61 - 60) / (90 - 60) = 3%; its +1 point is inside 1.96 x its paired stderr
    assert text == (
        "F7 (recovery after pruning: lora on testbed:mix, 100 steps): "
        f"at 50% (unpruned 90.0 \u00b1 {_se(0.9):.1f}%): "
        f"ean+lora 50.0 \u00b1 {_se(0.5):.1f}% (no twin without recovery: same method, parameters, calibration and "
        "ratio); "
        f"frequency 60.0 \u00b1 {_se(0.6):.1f}% -> 61.0 \u00b1 {_se(0.61):.1f}% (tie (+1.0 \u00b1 {_paired_se(1):.1f} "
        "points, paired over 200 items: inside its 95% interval)), closes 3% of the gap to the unpruned; "
        f"reap 40.0 \u00b1 {_se(0.4):.1f}% -> 70.0 \u00b1 {_se(0.7):.1f}% (yes (+30.0 \u00b1 {_paired_se(30):.1f} "
        "points, paired over 200 items)), closes 60% of the gap to the unpruned; "
        "ranking before recovery: frequency > reap; after: reap > frequency")
    assert Z95 * _paired_se(1) >= 1.0 and _paired_se(30) == pytest.approx(3.26, abs=0.01)


def test_f7_gap_when_the_twin_is_not_below_the_unpruned_and_without_twins():
    def rows(values):  # (cell, method_id, ratio, recover, accuracy)
        return pd.DataFrame([{"cell": c, "model": "m", "method_id": m, "method": "unpruned" if m == "none" else
                              m + (f"+{r}" if r else ""), "params": "{}", "skip": "none", "calib": "", "ratio": q,
                              "apply": "physical", "recover": r, "baseline": m == "none", "limited": False,
                              "accuracy": a, "accuracy_stderr": float("nan")} for c, m, q, r, a in values])

    even = f7(rows([("b", "none", 0.0, "", 0.9), ("r", "reap", 0.5, "", 0.9), ("rl", "reap", 0.5, "lora", 0.92)]))
    assert even == ("F7 (recovery after pruning: lora): at 50% (unpruned 90.0%): reap 90.0% -> 92.0% (yes (+2.0 "
                    "points, no stderr known)), gap closed n/a (not below the unpruned before recovery)")
    alone = f7(rows([("b", "none", 0.0, "", 0.9), ("rl", "reap", 0.5, "lora", 0.7)]))
    assert alone == ("F7 (recovery after pruning: lora): not measured (no recovered cell has a twin without "
                     "recovery: same model, method, parameters, calibration and ratio; recovered: reap+lora 50% "
                     "70.0%)")


def test_f7_is_stated_only_when_the_study_has_recovered_cells(study, tmp_path):
    stated = findings(study)
    assert [s[:3] for s in stated] == ["F1 ", "F2 ", "F3 ", "F4 ", "F5 ", "F6 ", "F7 "]
    plain = write_study(str(tmp_path), [cell("base", "none", 0.0, 0, items=correct(90)),
                                        cell("reap50", "reap", 0.5, 0, items=correct(40))], study="plain")
    assert [s[:3] for s in findings(load_studies(plain)[0])] == ["F1 ", "F2 ", "F3 ", "F4 ", "F5 ", "F6 "]


def _points(fig) -> dict[str, tuple]:
    """legend label -> (x, y, half of its interval bar, colour, marker, filled) of every drawn point."""
    out = {}
    for ax in fig.axes:
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                line, _, bars = container
                segments = bars[0].get_segments() if bars else []
                half = (segments[0][1][1] - segments[0][0][1]) / 2 if segments else None
                out[(ax.get_title(), container.get_label())] = (
                    float(line.get_xdata()[0]), float(line.get_ydata()[0]), half, mcolors.to_hex(line.get_color()),
                    line.get_marker(), line.get_markerfacecolor() != "white")
    return out


def test_figure_draws_each_method_before_and_after_recovery(study, table):
    styles = style.report_styles(table)
    with style.figure_style():
        figure = F.recovery_after_finetune(table, styles, study.runs)
        assert figure.name == "recovery_after_finetune" and "lora on testbed:mix, 100 steps" in figure.caption
        assert "1 recovered cell(s) have no twin" in figure.caption and "Bars: 95% interval" in figure.caption
        (ax,) = [a for a in figure.fig.axes if a.axison]
        assert ax.get_title() == "ratio 0.50"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["ean+lora", "frequency", "reap"]
        points = _points(figure.fig)
        expected = {"reap": (40, False), "reap+lora": (70, True), "frequency": (60, False),
                    "frequency+lora": (61, True), "ean+lora": (50, True)}
        assert {label for _, label in points} == set(expected)
        for (_, label), (_x, y, half, colour, marker, filled) in points.items():
            acc, after = expected[label]
            assert y == pytest.approx(acc) and filled == after, label
            assert half == pytest.approx(Z95 * _se(acc / 100), rel=1e-6), label
            assert (colour, marker) == (styles[label].color.lower(), styles[label].marker), label
        # before left of after, at the method's position
        assert points[("ratio 0.50", "reap")][0] < 2 < points[("ratio 0.50", "reap+lora")][0]
        assert points[("ratio 0.50", "ean+lora")][0] == 0
        reference = [ln for ln in ax.get_lines() if ln.get_label() == "unpruned"]
        assert reference and reference[0].get_ydata()[0] == pytest.approx(90) and reference[0].get_linestyle() == "--"
        legend = next(a.get_legend() for a in figure.fig.axes if not a.axison and a.get_legend() is not None)
        assert [t.get_text() for t in legend.get_texts()] == ["unpruned", "ean+lora", "frequency", "frequency+lora",
                                                              "reap", "reap+lora"]
        style.close(figure.fig)
    skipped = F.recovery_after_finetune(table[table["recover"] == ""])
    assert isinstance(skipped, F.Skipped) and skipped.note.startswith("no recovered cells")


def test_report_and_leaderboard_show_recovered_cells(study, tmp_path):
    folder = os.path.dirname(study.source)  # <results>/rec
    assert main(["report", folder, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "rec" / "report.md").read_text()
    assert "### Figure 6: Accuracy before and after recovery training" in text  # after the recovery heat map
    assert "(figures/recovery_after_finetune.png)" in text
    assert "- recovery training: lora on testbed:mix, 100 steps: 3 cells, trained after their method" in text
    assert "Method names ending in `+lora`, `+router_kd` or `+full` (e.g. reap+lora): the cell was trained" in text
    assert "| testbed-8e | reap+lora | testbed:mix | 0.50 | 70.00 \u00b1" in text
    write_leaderboard(os.path.dirname(folder), str(tmp_path), MetricSpec())
    board = (tmp_path / "leaderboard.md").read_text()
    note = "Method names ending in +lora, +router_kd or +full (e.g. reap+lora): the cell was trained after pruning"
    assert note in board and note in (tmp_path / "leaderboard.html").read_text()
    ratio = board.split("### Ratio 0.50")[1].split("###")[0]
    ranked = [line.split(" | ")[2] for line in ratio.splitlines() if line.startswith("| rec ")]
    assert ranked == ["reap+lora", "frequency+lora", "frequency", "ean+lora", "reap"]  # by recovery: 70, 61, 60 ...
    assert "| rec | testbed-8e | reap+lora | testbed:mix | 0.50 | 70.00 \u00b1 3.26 | 77.8 |" in ratio
    # a leaderboard without recovered cells reads as before: no such note
    plain = write_study(str(tmp_path / "plain"), [cell("base", "none", 0.0, 0.9), cell("reap50", "reap", 0.5, 0.4)],
                        study="plain")
    write_leaderboard(os.path.dirname(plain), str(tmp_path / "plain-board"), MetricSpec())
    assert "+lora" not in (tmp_path / "plain-board" / "leaderboard.md").read_text()
