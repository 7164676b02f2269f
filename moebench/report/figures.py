"""Paper figures drawn from the tidy tables only: accuracy, recovery and speedup vs ratio, and the
memory-accuracy Pareto front, each faceted by method kind (`moebench.report.facets`).

Every function returns a `Figure` (open matplotlib figure plus its file stem, title, caption) or a
`Skipped` note saying which data were missing. In every panel: the unpruned model (black, dashed),
the random baseline as a grey band (min-max over its seeds), at most six series, each method in the
colour and marker it has throughout the report (``styles``, `style.report_styles`; line style:
calibration source), the panel's legend below it. Cells run with an lm-eval ``limit`` are drawn
with hollow markers. Accuracies carry their 95% interval (1.96 standard errors) where the scores
table has standard errors; speeds carry their spread over repetitions.
"""

from __future__ import annotations

import math

import pandas as pd

from moebench.report import facets, style
from moebench.report.heatmaps import calibration_effect, recovery_heatmap
from moebench.report.layout import (
    Figure,
    Series,
    Skipped,
    columns_for,
    facet_grid,
    outer_labels,
    panel_legend,
    shared_legend,
)
from moebench.report.textfmt import byte_unit
from moebench.report.uncertainty import Z95, speedup_interval

__all__ = [
    "Figure",
    "Series",
    "Skipped",
    "accuracy_vs_ratio",
    "calibration_effect",
    "memory_pareto",
    "pareto_front",
    "recovery_heatmap",
    "recovery_vs_ratio",
    "speedup_vs_ratio",
]
XLABEL = "fraction of experts removed"


def _panels(table: pd.DataFrame) -> tuple[list[facets.Panel], Series]:
    series = Series(table)
    return facets.panels(table, series.shown), series


def _band(part: pd.DataFrame, value) -> tuple[list, list, list, int]:
    """The random baseline per ratio: (ratios, min, max, seeds) of ``value(rows)`` over its cells."""
    rows = part[part["facet"] == facets.BAND].dropna(subset=["ratio"])
    xs, lo, hi = [], [], []
    for ratio, group in rows.groupby("ratio", sort=True):
        values = [v for v in value(group) if not pd.isna(v)]
        if values:
            xs.append(ratio)
            lo.append(min(values))
            hi.append(max(values))
    return xs, lo, hi, int(rows["method"].nunique())


def _reference(ax, value: float | None, label: str = "unpruned") -> None:
    if value is not None:
        ax.axhline(value, color=style.REFERENCE_COLOUR, linestyle="--", linewidth=0.9, label=label, zorder=1)


def _draw_band(ax, part: pd.DataFrame, column: str, scale: float, start: float | None) -> None:
    xs, lo, hi, seeds = _band(part, lambda g: list(g[column] * scale))
    if not xs:
        return
    if start is not None and 0.0 not in xs:
        xs, lo, hi = [0.0, *xs], [start, *lo], [start, *hi]
    if seeds > 1:
        ax.fill_between(xs, lo, hi, color=style.BAND_COLOUR, alpha=0.45, linewidth=0, zorder=0,
                        label=f"random, {seeds} seeds (min-max)")
    else:
        ax.plot(xs, lo, color=style.BAND_COLOUR, linewidth=1.2, zorder=0, label="random")


def _common(table: pd.DataFrame, reference: str = "unpruned") -> list[str]:
    seeds = table.loc[table["facet"] == facets.BAND, "method"].nunique()
    return [reference] + ([f"random, {seeds} seeds (min-max)" if seeds > 1 else "random"] if seeds else [])


def _legends(fig_parts, panels, common: list[str], xlabel: str, ylabel: str, ratios=None) -> None:
    """Per-panel legends (series), the common strip, outer axis labels and ratio ticks."""
    _, axes, laxes, ncols, common_ax = fig_parts
    for ax, lax, ncol in zip(axes, laxes, ncols, strict=True):
        panel_legend(ax, lax, ncol, leave_out=tuple(common))
    shared_legend(axes, common_ax, max(1, len(common)), only=tuple(common))
    outer_labels(axes, columns_for(len(panels)), xlabel, ylabel)
    if ratios is not None and axes:
        axes[0].set_xticks(ratios, [f"{r:g}" for r in ratios])
        axes[0].set_xlim(min(ratios) - 0.05, max(ratios) + 0.05)


def _ratios(table: pd.DataFrame) -> list[float]:
    return sorted({0.0, *(float(r) for r in table["ratio"].dropna())})


def _interval(ax, xs, ys, stderrs, colour: str) -> int:
    """95% interval bars (``Z95`` x stderr) at the points that have a stderr; returns how many."""
    points = [(x, y, Z95 * e) for x, y, e in zip(xs, ys, stderrs, strict=True)
              if not (pd.isna(y) or e is None or pd.isna(e))]
    if points:
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt="none",
                    ecolor=colour, elinewidth=0.8, capsize=1.5, zorder=2)
    return len(points)


def _styles(table: pd.DataFrame, styles: style.MethodStyles | None) -> style.MethodStyles:
    return style.report_styles(table) if styles is None else styles


def _ratio_lines(table: pd.DataFrame, column: str, scale: float, ylabel: str, reference: float | None,
                 styles: style.MethodStyles, stderr: str | None = None):
    """Lines of ``column`` x ``scale`` vs ratio; with ``stderr``, 95% interval bars where it is known.
    Returns the figure, the series caption note and the number of interval bars drawn."""
    panels, series = _panels(table)
    common = _common(table)
    parts = facet_grid([p.labels() for p in panels], common)
    fig, axes = parts[:2]
    bars = 0
    for ax, panel in zip(axes, panels, strict=True):
        part = table[table["model"] == panel.model]
        base = part[part["baseline"]]
        base_value = base[column].iloc[0] * scale if len(base) and pd.notna(base[column].iloc[0]) else None
        start = reference if reference is not None else base_value
        _reference(ax, start)
        _draw_band(ax, part, column, scale, start)
        if stderr and base_value is not None and reference is None:
            bars += _interval(ax, [0.0], [base_value], [base[stderr].iloc[0] * scale], style.REFERENCE_COLOUR)
        for method, calib in panel.series:
            group = part[(part["method"] == method) & (part["calib"] == calib) & ~part["baseline"]].sort_values("ratio")
            x, y = list(group["ratio"]), list(group[column] * scale)
            kw = styles[method].line(panel.variant(calib))
            if stderr:
                bars += _interval(ax, x, y, list(group[stderr] * scale), kw["color"])
            if start is not None and 0.0 not in x:
                x, y = [0.0, *x], [start, *y]
            ax.plot(x, y, label=style.text(panel.label(method, calib)), **kw)
            limited = group[group["limited"]]
            ax.scatter(limited["ratio"], limited[column] * scale, facecolors="white", edgecolors=kw["color"],
                       marker=kw["marker"], s=18, zorder=3)
        ax.set_title(style.text(panel.title))
    _legends(parts, panels, common, XLABEL, ylabel, _ratios(table))
    return fig, series.note(), bars


BAND_NOTE = (" Each panel is one kind of method (at most six series); dashed black: unpruned; grey band: random "
             "pruning, min-max over its seeds.")


def accuracy_vs_ratio(table: pd.DataFrame, metric_text: str, styles: style.MethodStyles | None = None) -> Figure:
    """Average accuracy vs pruning ratio, a panel per method kind (and model), with 95% interval bars
    where the scores carry standard errors."""
    fig, note, bars = _ratio_lines(table, "accuracy", 100.0, "average accuracy (%)", None, _styles(table, styles),
                                   stderr="accuracy_stderr")
    intervals = (" Bars: 95% interval of each cell's average accuracy (1.96 standard errors, from the tasks' "
                 "standard errors; the unpruned model's at 0)." if bars else
                 " No bars: the scores table has no standard errors.")
    return Figure("accuracy_vs_ratio", "Average accuracy vs pruning ratio",
                  f"Average accuracy ({metric_text}) vs the ratio of routed experts removed." + BAND_NOTE + intervals
                  + note, fig)


def recovery_vs_ratio(table: pd.DataFrame, styles: style.MethodStyles | None = None) -> Figure:
    """Recovery (% of the unpruned model's accuracy) vs pruning ratio, a panel per method kind."""
    fig, note, _ = _ratio_lines(table, "recovery", 1.0, "recovery (% of unpruned)", 100.0, _styles(table, styles))
    return Figure("recovery_vs_ratio", "Recovery vs pruning ratio",
                  "Average accuracy as a percentage of the unpruned model's, vs pruning ratio." + BAND_NOTE + note,
                  fig)


def speedup_vs_ratio(table: pd.DataFrame, reps: int | None = None,
                     styles: style.MethodStyles | None = None) -> Figure | Skipped:
    """Paired decode speedup over the unpruned model vs ratio, with its 95% interval; hollow markers: cells
    timed unpaired or under load."""
    if table["decode_speedup"].notna().sum() == 0:
        return Skipped("speedup_vs_ratio", "Decode speedup vs ratio",
                       "no paired decode speedup in the runs table (decode_speedup): the study ran without "
                       "`measure`, or its cells are from before paired timing")
    styles = _styles(table, styles)
    panels, series = _panels(table)
    common = ["unpruned (1 by definition)"]
    parts = facet_grid([p.labels() for p in panels], common)
    fig, axes = parts[:2]
    flagged = 0
    for ax, panel in zip(axes, panels, strict=True):
        part = table[table["model"] == panel.model]
        _reference(ax, 1.0, common[0])
        for i, (method, calib) in enumerate(panel.series):
            group = part[(part["method"] == method) & (part["calib"] == calib) & ~part["baseline"]].sort_values("ratio")
            points = [(r.ratio, speedup_interval(r._asdict()), r.speed_flag) for r in group.itertuples(index=False)]
            points = [p for p in points if p[1] is not None]
            if not points:
                continue
            dodge = (i - (len(panel.series) - 1) / 2) * 0.012
            kw = styles[method].line(panel.variant(calib))
            xs, ys = [x + dodge for x, _, _ in points], [s[1] for _, s, _ in points]
            err = [[s[1] - s[0] for _, s, _ in points], [s[2] - s[1] for _, s, _ in points]]
            ax.errorbar(xs, ys, yerr=err, capsize=2, elinewidth=0.8, label=style.text(panel.label(method, calib)),
                        **kw)
            hollow = [(x, y) for x, y, (_, _, flag) in zip(xs, ys, points, strict=True) if flag]
            flagged += len(hollow)
            if hollow:
                ax.scatter(*zip(*hollow, strict=True), facecolors="white", edgecolors=kw["color"], marker=kw["marker"],
                           s=16, zorder=3)
        ax.set_title(style.text(panel.title))
    _legends(parts, panels, common, XLABEL, "decode speedup (x unpruned)", _ratios(table))
    hollow = (f" Hollow markers ({flagged}): timed unpaired or under load, no verdict." if flagged else "")
    return Figure("speedup_vs_ratio", "Decode speedup vs pruning ratio",
                  "Each cell's decode speedup over the unpruned model, timed interleaved with it in the cell's own "
                  "process and experts kernel: the median of the per-repetition time ratios, bars its 95% interval"
                  + (f" over {reps} repetitions" if reps else "") + ". Points are offset sideways to keep bars apart."
                  + hollow + series.note(), fig)


def pareto_front(memory: list[float], accuracy: list[float]) -> list[int]:
    """Indices of the points no other point beats on both lower memory and higher accuracy, by memory."""
    order = sorted(range(len(memory)), key=lambda i: (memory[i], -accuracy[i]))
    front, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


def memory_pareto(table: pd.DataFrame, styles: style.MethodStyles | None = None) -> Figure | Skipped:
    """Measured run peak on GPUs (resident weights on CPUs or where not measured) vs average accuracy, a panel
    per method kind, with the Pareto front of all of the model's cells in each; a method's cells are joined
    in order of ratio (line style: calibration source)."""
    styles = _styles(table, styles)
    gpu = (table["run_peak_bytes"].notna().all() and len(table) > 0
           and table["memory_measure"].astype(str).str.startswith("cuda").all())
    column = "run_peak_bytes" if gpu else "weight_bytes"
    data = table[table[column].notna() & table["accuracy"].notna()]
    if data.empty:
        return Skipped("memory_pareto", "Memory vs accuracy",
                       "no memory measurements or weight sizes in the runs table")
    div, unit = byte_unit(data[column])
    panels, series = _panels(data)
    common = ["unpruned", "Pareto front (all cells)", "other cells"]
    parts = facet_grid([p.labels() for p in panels], common)
    fig, axes = parts[:2]
    for ax, panel in zip(axes, panels, strict=True):
        part = data[data["model"] == panel.model].reset_index(drop=True)
        mem, acc = list(part[column] / div), list(part["accuracy"] * 100)
        front = pareto_front(mem, acc)
        ax.step([mem[i] for i in front], [acc[i] for i in front], where="post", color="#666666", linewidth=0.9,
                label="Pareto front (all cells)", zorder=1)
        mine = set(panel.series)
        others = [i for i, r in part.iterrows() if (r["method"], r["calib"]) not in mine and not r["baseline"]]
        ax.scatter([mem[i] for i in others], [acc[i] for i in others], color=style.BAND_COLOUR, s=9, zorder=1,
                   label="other cells", linewidths=0)
        for i in part.index[part["baseline"]]:
            ax.scatter(mem[i], acc[i], color=style.REFERENCE_COLOUR, marker=style.BASELINE.marker, s=50,
                       label="unpruned", zorder=3)
        for method, calib in panel.series:
            kw = {**styles[method].line(panel.variant(calib)), "linewidth": 0.8, "markersize": 4.5}
            rows = part[(part["method"] == method) & (part["calib"] == calib) & ~part["baseline"]]
            rows = rows.sort_values("ratio")
            ax.plot([mem[i] for i in rows.index], [acc[i] for i in rows.index], zorder=2,
                    label=style.text(panel.label(method, calib)), **kw)
            limited = [i for i in rows.index if rows.at[i, "limited"]]
            if limited:
                ax.scatter([mem[i] for i in limited], [acc[i] for i in limited], facecolors="white",
                           edgecolors=kw["color"], marker=kw["marker"], s=22, zorder=3)
        ax.set_title(style.text(panel.title))
    _legends(parts, panels, common, ("run peak, GPU" if gpu else "resident weights") + f" ({unit})",
             "average accuracy (%)")
    what = ("GPU memory at its peak while evaluated and timed (bytes torch allocated, after the method was "
            "applied)" if gpu else "resident weight bytes (the measured run peak on a CPU is the whole "
            "process's resident set, mostly the runtime; it is in the main table)")
    return Figure("memory_pareto", "Memory vs accuracy (Pareto front)",
                  f"Each cell's {what} vs average accuracy, a panel per kind of method; a method's cells are joined "
                  "in order of ratio (line style: calibration source); the dark steps join the cells no other cell "
                  "of the model beats on both; grey dots: the model's other cells." + series.note(), fig)
