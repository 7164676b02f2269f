"""How sure a number is: stderr of average accuracy, paired differences on per-item results, speed spread.

Accuracy. A cell's average accuracy is the mean over tasks of each task's mean over items; its
standard error is sqrt(sum_t se_t^2) / T from lm-eval's per-task stderrs (`tables.average_stderr`).

Differences between two cells (`difference`):

* **paired** when both cells have per-item results (``cells/<id>/items.csv.gz``) for the same items
  of every averaged task (same ``doc_id`` and document hash): d_ti = a_ti - b_ti, the difference is
  mean_t mean_i d_ti and its stderr sqrt(sum_t var_i(d_ti) / n_t) / T (sample variance). Pairing
  removes the variance the two cells share (items both get right or wrong), so it resolves smaller
  differences than the stderrs alone;
* **stderr** otherwise (cells from before per-item files were recorded): the difference of the two
  averages with stderr sqrt(se_a^2 + se_b^2), as if independent (conservative).

A difference is a **tie** when it lies inside its 95% interval, |d| <= 1.96 x stderr (a two-sided
z-test at 5%; a zero stderr ties only an exact zero). Means over several cells (random over seeds)
average values, items and stderrs (sqrt(sum se^2) / k).

Speed. A speedup is a cell's own paired ratio (`moebench.measure.paired`): the median over
repetitions of reference time / variant time, timed interleaved in one process, with a 95%
distribution-free interval of that median (``_lo``, ``_hi``). It differs measurably from 1 only when
the interval excludes 1 (`speed_verdict`), and no verdict is given for a cell whose timing was not
paired or ran under load (`moebench.report.tables.speed_flag`). Cells from before paired timing
have no speedup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moebench.report.tables import MetricSpec, StudyData, averaged_tasks, task_metric

Z95 = 1.96


@dataclass(frozen=True)
class Estimate:
    """An accuracy (fraction), its stderr (None when unknown), per-item values (None when not recorded)."""

    value: float
    stderr: float | None
    items: pd.Series | None = None  # (task, doc_id, doc_hash) -> value
    cells: tuple = ()


@dataclass(frozen=True)
class Difference:
    """a - b in points (percent), its stderr in points, how it was computed and over how many items."""

    points: float
    stderr: float | None
    test: str  # "paired", "stderr" or "none"
    n_items: int = 0

    @property
    def tie(self) -> bool:
        """Inside the 95% interval (no stderr known: only an exact zero ties)."""
        if self.stderr is None or math.isnan(self.stderr):
            return self.points == 0
        return abs(self.points) <= Z95 * self.stderr + 1e-12

    def describe(self) -> str:
        """``+1.2 ± 0.8 points (paired over 900 items)`` (± the stderr; the test named)."""
        if self.stderr is None or math.isnan(self.stderr):
            return f"{self.points:+.1f} points, no stderr known"
        how = f"paired over {self.n_items} items" if self.test == "paired" else "stderr-based, no per-item results"
        return f"{self.points:+.1f} \u00b1 {self.stderr:.1f} points, {how}"


def item_values(study: StudyData, cell: str, spec: MetricSpec, tasks: list[str]) -> pd.Series | None:
    """(task, doc_id, doc_hash) -> the averaged metric per item of ``tasks``; None when any task lacks items."""
    frame = study.items(cell)
    if frame is None:
        return None
    parts = []
    for task in tasks:
        choice = task_metric(study.scores, task, spec)
        rows = frame[(frame["task"] == task) & (frame["metric"] == (choice or ("", ""))[0])
                     & (frame["filter"] == (choice or ("", ""))[1])] if choice else frame.iloc[:0]
        if rows.empty:
            return None
        parts.append(rows.set_index(["task", "doc_id", "doc_hash"])["value"])
    return pd.concat(parts).sort_index()


def combine(estimates: list[Estimate]) -> Estimate | None:
    """The mean of several cells' estimates (random over seeds): values, stderrs (sqrt(sum se^2) / k) and
    items (when all cover the same items) averaged."""
    estimates = [e for e in estimates if e is not None]
    if not estimates:
        return None
    k = len(estimates)
    errs = [e.stderr for e in estimates]
    stderr = None if any(x is None or math.isnan(x) for x in errs) else math.sqrt(sum(x * x for x in errs)) / k
    items = [e.items for e in estimates]
    same = all(i is not None for i in items) and all(i.index.equals(items[0].index) for i in items)
    return Estimate(sum(e.value for e in estimates) / k, stderr, sum(items[1:], items[0]) / k if same else None,
                    tuple(c for e in estimates for c in e.cells))


def cell_estimates(study: StudyData, table: pd.DataFrame, spec: MetricSpec) -> dict[str, Estimate]:
    """cell -> its `Estimate` (accuracy and stderr from ``table``, a `tables.summary`; items where recorded)."""
    tasks = averaged_tasks(study.scores, spec)
    out = {}
    for row in table.dropna(subset=["accuracy"]).itertuples(index=False):
        err = None if pd.isna(row.accuracy_stderr) else float(row.accuracy_stderr)
        out[row.cell] = Estimate(float(row.accuracy), err, item_values(study, row.cell, spec, tasks), (row.cell,))
    return out


def estimate(study: StudyData, table: pd.DataFrame, cells: list[str], spec: MetricSpec) -> Estimate | None:
    """The mean accuracy of ``cells`` (rows of `tables.summary`), with stderr and items where known."""
    known = cell_estimates(study, table[table["cell"].isin(cells)], spec)
    return combine([known[c] for c in sorted(known)])


def difference(a: Estimate, b: Estimate) -> Difference:
    """a - b (see the module docstring: paired on items where both have the same items, else stderrs)."""
    if a.items is not None and b.items is not None and a.items.index.equals(b.items.index) and len(a.items):
        d = a.items - b.items
        by_task = d.groupby(level="task")
        means, var, n = by_task.mean(), by_task.var(ddof=1).fillna(0.0), by_task.size()
        points = 100.0 * float(means.mean())
        stderr = 100.0 * float(np.sqrt((var / n).sum()) / len(means))
        return Difference(points, stderr, "paired", len(d))
    points = 100.0 * (a.value - b.value)
    if a.stderr is None or b.stderr is None:
        return Difference(points, None, "none")
    return Difference(points, 100.0 * math.hypot(a.stderr, b.stderr), "stderr")


def task_difference(study: StudyData, table: pd.DataFrame, cell_a: str, cell_b: str, task: str,
                    spec: MetricSpec) -> Difference | None:
    """a - b on one task (its own metric), paired on items where both cells have them."""
    choice = task_metric(study.scores, task, spec)
    if choice is None:
        return None
    rows = study.scores[(study.scores["task"] == task) & (study.scores["metric"] == choice[0])
                        & (study.scores["filter"] == choice[1])].set_index("cell")
    if cell_a not in rows.index or cell_b not in rows.index:
        return None
    ests = []
    for cell in (cell_a, cell_b):
        err = rows.at[cell, "stderr"]
        ests.append(Estimate(float(rows.at[cell, "value"]), None if pd.isna(err) else float(err),
                             item_values(study, cell, spec, [task]), (cell,)))
    return difference(*ests)


def speedup_interval(row, prefix: str = "", stage: str = "decode") -> tuple[float, float, float] | None:
    """``(lo, median, hi)`` of a runs or summary row's paired speedup (``{prefix}{stage}_speedup``); None when
    not measured. A missing interval is the median alone."""
    median = row.get(f"{prefix}{stage}_speedup")
    if median is None or pd.isna(median):
        return None
    lo, hi = row.get(f"{prefix}{stage}_speedup_lo"), row.get(f"{prefix}{stage}_speedup_hi")
    lo = median if lo is None or pd.isna(lo) else lo
    hi = median if hi is None or pd.isna(hi) else hi
    return float(lo), float(median), float(hi)


def speed_verdict(row, prefix: str = "", stage: str = "decode", flag: str = "") -> str:
    """A paired speedup in words: ``x1.12 (95% interval 1.05-1.20)`` when the interval excludes 1, ``no measurable
    change (...)`` when it holds 1, ``not measured``, or, with a ``flag`` (`tables.speed_flag`), the
    figure with no verdict."""
    got = speedup_interval(row, prefix, stage)
    if got is None:
        return f"{stage} speed not measured"
    lo, median, hi = got
    figure = f"x{median:.2f}, 95% interval {lo:.2f}-{hi:.2f}"
    if flag:
        return f"{stage} speed {figure}: no verdict ({flag}: {FLAG_MEANING.get(flag, flag)})"
    if lo <= 1.0 <= hi:
        return f"{stage} speed: no measurable change ({figure})"
    return f"{stage} speed {'faster' if median > 1 else 'slower'} ({figure})"


FLAG_MEANING = {"unpaired": "not timed interleaved with its reference",
                "under load": "other processes used the cores it needed while it was timed"}
