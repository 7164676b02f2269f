"""Paper figures drawn from the tidy tables only: accuracy, recovery and speedup vs ratio, and the
memory-accuracy Pareto front, each faceted by method kind (`moebench.report.facets`); and accuracy
before and after recovery training (`recovery_after_finetune`), a panel per ratio.

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
    shared_grid,
    shared_legend,
)
from moebench.report.tables import recover_text, twins
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
    "recovery_after_finetune",
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


RECOVERY_NAME, RECOVERY_TITLE = "recovery_after_finetune", "Accuracy before and after recovery training"
NO_RECOVERY = ("no recovered cells: no method entry of the study has a `recover:` stage (training after pruning), "
               "so there is no accuracy before and after recovery to compare")


def _look(styles: style.MethodStyles, method: str) -> style.Look:
    """A method's look; random's seeds (the band elsewhere, not in the style table) are grey circles."""
    return styles[method] if method in styles else style.Look(style.BAND_COLOUR, "o")


def _recovery_panels(table: pd.DataFrame) -> list[tuple[str, float, list[tuple[str, list]]]]:
    """(model, ratio, [(x label, [(cell row, after?), ...]), ...]) per panel: at each x the twin (before),
    then the recovered cells of the same method, parameters and calibration (after)."""
    found = twins(table)
    recovered = table[(table["recover"] != "") & table["accuracy"].notna()]
    by_cell = table.set_index("cell")
    out = []
    for (model, ratio), rows in recovered.groupby(["model", "ratio"], sort=True):
        groups: dict[tuple, list] = {}
        for _, row in rows.sort_values(["method", "cell"]).iterrows():
            twin = found.get(row["cell"])
            before = by_cell.loc[twin].to_dict() | {"cell": twin} if twin else None
            members = groups.setdefault((before["method"] if before else row["method"], row["calib"]), [])
            if before and not members and pd.notna(before["accuracy"]):
                members.append((before, False))
            members.append((row.to_dict(), True))
        counts = pd.Series([name for name, _ in groups]).value_counts()
        xs = [(name + (f"\n[{calib}]" if counts[name] > 1 and calib else ""), groups[(name, calib)])
              for name, calib in sorted(groups)]
        out.append((model, float(ratio), xs))
    return out


def recovery_after_finetune(table: pd.DataFrame, styles: style.MethodStyles | None = None,
                            runs: pd.DataFrame | None = None) -> Figure | Skipped:
    """Average accuracy of each recovered cell beside its twin (the same cell without recovery), a panel per
    ratio (and model), a method per x position, 95% intervals, the unpruned accuracy as the reference line.
    ``runs`` (the runs table) only names the recovery settings in the caption."""
    if "recover" not in table or not ((table["recover"] != "") & table["accuracy"].notna()).any():
        return Skipped(RECOVERY_NAME, RECOVERY_TITLE, NO_RECOVERY)
    styles = _styles(table, styles)
    panels = _recovery_panels(table)
    several = table["model"].nunique() > 1
    labels = ["unpruned", *dict.fromkeys(row["method"] for _, _, xs in panels for _, m in xs for row, _ in m)]
    ncols = min(3, columns_for(len(panels)))
    fig, axes, lax, ncol = shared_grid(len(panels), labels, plot_h=1.6, ncols=ncols, sharey=True)
    bars, alone = 0, 0
    for ax, (model, ratio, xs) in zip(axes, panels, strict=True):
        base = table[(table["model"] == model) & table["baseline"]]
        _reference(ax, 100 * base["accuracy"].iloc[0] if len(base) and pd.notna(base["accuracy"].iloc[0]) else None)
        for x, (_, members) in enumerate(xs):
            alone += len(members) if all(after for _, after in members) else 0
            offsets = [(j - (len(members) - 1) / 2) * 0.28 for j in range(len(members))]
            points = [(x + dx, 100 * row["accuracy"]) for dx, (row, _) in zip(offsets, members, strict=True)]
            if not members[0][1]:  # from the twin to each recovered cell
                for after_point in points[1:]:
                    ax.plot(*zip(points[0], after_point, strict=True), color=style.BAND_COLOUR, linewidth=0.8,
                            zorder=1)
            for (px, py), (row, after) in zip(points, members, strict=True):
                look = _look(styles, row["method"])
                err = row.get("accuracy_stderr")
                known = err is not None and pd.notna(err)
                bars += known
                ax.errorbar([px], [py], yerr=[100 * Z95 * err] if known else None, color=look.color,
                            marker=look.marker, markersize=5, linestyle="none", elinewidth=0.8, capsize=2,
                            markerfacecolor=look.color if after else "white", markeredgewidth=1.0, zorder=3,
                            label=style.text(row["method"]))
        names = [style.text(name) for name, _ in xs]
        tilt = len(xs) > 3 or max(map(len, names)) > 14  # long or many names: slanted, so they never overlap
        ax.set_xticks(range(len(xs)), names, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.grid(False, axis="x")
        ax.set_title(style.text(f"{model}, ratio {ratio:.2f}" if several else f"ratio {ratio:.2f}"))
    outer_labels(axes, ncols, "", "average accuracy (%)")
    shared_legend(axes, lax, ncol)
    settings = {} if runs is None or "recover" not in runs else dict(zip(runs["cell"], runs["recover"], strict=True))
    how = sorted({recover_text(settings.get(c, "")) for c in table.loc[table["recover"] != "", "cell"]} - {""})
    intervals = (" Bars: 95% interval (1.96 standard errors of the average accuracy)." if bars else
                 " No bars: the scores table has no standard errors.")
    lonely = f" {alone} recovered cell(s) have no twin (with an accuracy) in the study: drawn alone." if alone else ""
    return Figure(RECOVERY_NAME, RECOVERY_TITLE,
                  "Average accuracy of each pruned cell before recovery training (hollow marker: the same method, "
                  "parameters, calibration and ratio without recovery) and after it (filled, joined by a grey line; "
                  "the method named with its recovery kind, e.g. reap+lora), a panel per ratio"
                  + (f"; recovery: {'; '.join(how)}" if how else "") + ". Dashed black: unpruned." + intervals
                  + lonely, fig)
