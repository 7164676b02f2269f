"""Results as data: a study's tidy tables as pandas DataFrames, with the definitions the reports use.

    import moebench.results

    res = moebench.results.load("results/demo")          # a study folder (or a folder holding one study)
    res.runs, res.scores, res.latency                      # the tidy tables, one row per cell / score / length
    table = res.summary()                                  # the reports' main table, one row per cell
    table.plot.scatter("decode_speedup", "accuracy")       # your own figure

`Results.summary` is the report's main table (`moebench.report.tables.summary`): average accuracy
over the study's tasks with its standard error, recovery (% of the unpruned cell of the same
model), resident weight bytes, the cell's own run peak, and the paired decode speedup against the
unpruned model timed in the same process (``decode_speedup_lo`` / ``_hi``: its 95% interval;
``speed_flag`` says when it was not paired or the machine was loaded). `results_table` renders the
few columns a reader wants first; `moebench grid run` and `moebench collect` print it at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from moebench.report.tables import MetricSpec, StudyData, load_studies, summary

SHOWN = ["model", "method", "calib", "ratio", "accuracy", "recovery", "weights", "run peak", "decode speedup"]


@dataclass
class Results:
    """One study's tables. ``runs``: one row per cell (spec, memory, speed, machine load); ``scores``: one row
    per (cell, task, metric, filter) with its stderr; ``latency``: per-token latency by prompt length (None when
    the study measured none)."""

    name: str
    runs: pd.DataFrame
    scores: pd.DataFrame
    latency: pd.DataFrame | None
    study: StudyData

    def summary(self, metric: str = "acc", filter: str = "none", task_metrics: dict | None = None) -> pd.DataFrame:
        """One row per cell, as in the report's main table (columns: `moebench.report.tables.SUMMARY_COLUMNS`).

        ``metric`` / ``filter``: the score averaged over the study's tasks (``task_metrics``: per-task
        overrides, e.g. ``{"gsm8k": "exact_match"}``).
        """
        return summary(self.study, MetricSpec(metric, filter, dict(task_metrics or {})))


def load(path: str, study: str | None = None) -> Results:
    """The study under ``path`` (a study folder with ``tables/``, or a folder of studies: name one with
    ``study`` when there are several). Run ``moebench collect`` first where the tables are missing."""
    found = load_studies(path)
    if study is not None:
        found = [s for s in found if s.name == study]
        if not found:
            raise ValueError(f"{path}: no study {study!r}; it holds {sorted(s.name for s in load_studies(path))}")
    if len(found) > 1:
        raise ValueError(f"{path} holds {len(found)} studies ({', '.join(s.name for s in found)}): name one, "
                         "load(path, study=NAME)")
    data = found[0]
    return Results(data.name, data.runs, data.scores, data.latency, data)


def _mib(value) -> str:
    return "" if pd.isna(value) else f"{value / 2**20:.1f} MiB"


def results_table(table: pd.DataFrame, limit: int | None = 40) -> str:
    """A plain-text table of a `Results.summary`: method, ratio, calibration, accuracy +- stderr, recovery,
    resident weights, run peak and the paired decode speedup with its interval (flagged where unpaired or
    measured under load). At most ``limit`` rows (the rest counted)."""
    from tabulate import tabulate

    rows = []
    for row in table.itertuples(index=False):
        acc = "" if pd.isna(row.accuracy) else f"{row.accuracy:.3f}" + (
            "" if pd.isna(row.accuracy_stderr) else f" ± {row.accuracy_stderr:.3f}")
        speed = "" if pd.isna(row.decode_speedup) else f"x{row.decode_speedup:.2f}"
        lo, hi = getattr(row, "decode_speedup_lo", float("nan")), getattr(row, "decode_speedup_hi", float("nan"))
        if speed and not pd.isna(lo) and not pd.isna(hi):
            speed += f" [{lo:.2f}, {hi:.2f}]"
        if speed and row.speed_flag:
            speed += f" ({row.speed_flag})"
        rows.append([row.model, row.method, row.calib if isinstance(row.calib, str) and row.calib else "-",
                     f"{row.ratio:g}", acc + (" (limited)" if row.limited else ""),
                     "" if pd.isna(row.recovery) else f"{row.recovery:.1f}%", _mib(row.weight_bytes),
                     _mib(row.run_peak_bytes), speed])
    shown = rows if limit is None else rows[:limit]
    text = tabulate(shown, headers=SHOWN, tablefmt="simple", disable_numparse=True)
    if len(rows) > len(shown):
        text += f"\n... and {len(rows) - len(shown)} more rows (moebench.results.load(...).summary() has them all)"
    return text
