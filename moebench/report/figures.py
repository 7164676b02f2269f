"""Paper figures drawn from the tidy tables only: accuracy, recovery and speedup vs ratio, the
memory-accuracy Pareto front, the recovery heatmap and the calibration-domain effect.

Every function returns a `Figure` (open matplotlib figure plus its file stem, title, caption) or a
`Skipped` note saying which data were missing. Series are coloured by method (Okabe-Ito, stable
across all figures of a report) and styled by calibration source; the unpruned model is black.
Cells run with an lm-eval ``limit`` are drawn with hollow markers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moebench.report import style
from moebench.report.textfmt import byte_unit

MAX_LINE_CALIBS = 2


@dataclass
class Figure:
    """A drawn figure: ``name`` (file stem), title, caption; ``fig`` is closed once saved."""

    name: str
    title: str
    caption: str
    fig: object = None
    paths: list = field(default_factory=list)


@dataclass
class Skipped:
    """A figure that could not be drawn, and why."""

    name: str
    title: str
    note: str


class Series:
    """Stable colour per method and line style per calibration source within one report.

    Line figures draw every calibration source when a study has at most `MAX_LINE_CALIBS`; beyond
    that, each method's primary source only (generic ``testbed:mix`` / ``c4`` when it has one, else
    its first), so panels stay readable; tables and the calibration-effect figure cover the rest.
    """

    def __init__(self, table: pd.DataFrame):
        pruned = table[~table["baseline"]]
        self.methods = sorted(pruned["method"].unique())
        self.calibs = sorted(c for c in pruned["calib"].unique() if c)
        self.many_calibs = len(self.calibs) > 1
        self.primary = {}
        for method, group in pruned.groupby("method", sort=True):
            calibs = sorted(set(group["calib"]))
            generic = [c for c in ("testbed:mix", "c4") if c in calibs]
            self.primary[method] = (generic or calibs)[0]
        self.all_calibs = len(self.calibs) <= MAX_LINE_CALIBS

    def shown(self, method: str, calib: str) -> bool:
        """Whether line figures draw the series (see the class docstring)."""
        return self.all_calibs or calib == self.primary.get(method)

    def note(self) -> str:
        """Caption sentence saying which calibrations the lines show."""
        return "" if self.all_calibs else (" Lines show each method's primary calibration (testbed:mix or c4 where "
                                           "used); the tables and the calibration-effect figure cover the others.")

    def label(self, method: str, calib: str) -> str:
        """Legend text of a series."""
        return f"{method} [{calib}]" if self.many_calibs and calib else method

    def style(self, method: str, calib: str) -> dict:
        """Line and marker keywords of a series."""
        variant = self.calibs.index(calib) if calib in self.calibs else 0
        return style.series_style(self.methods.index(method), variant)

    def colour(self, method: str) -> str:
        """The colour of a method."""
        return style.SERIES_COLOURS[self.methods.index(method) % len(style.SERIES_COLOURS)]


def panels(n: int, ncols: int = 3, width: float = 3.0, height: float = 2.4):
    """A figure with ``n`` panels in rows of ``ncols``; returns (fig, axes) with unused axes hidden."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def shared_legend(fig, axes) -> None:
    """One legend below all panels (labels deduplicated, in first-seen order), then a tight layout."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(4, len(labels)),
                   bbox_to_anchor=(0.5, -0.02), frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(labels) / 4), 1, 1))
    else:
        fig.tight_layout()


def _ratio_lines(table: pd.DataFrame, column: str, scale: float, ylabel: str, reference: float | None):
    series = Series(table)
    models = sorted(table["model"].unique())
    fig, axes = panels(len(models))
    for ax, model in zip(axes, models, strict=False):
        part = table[table["model"] == model]
        base = part[part["baseline"]]
        base_value = base[column].iloc[0] * scale if len(base) and pd.notna(base[column].iloc[0]) else None
        if reference is not None or base_value is not None:
            ax.axhline(reference if reference is not None else base_value, color=style.REFERENCE_COLOUR,
                       linestyle="--", linewidth=0.8, label="unpruned")
        for (method, calib), group in part[~part["baseline"]].groupby(["method", "calib"], sort=True):
            if not series.shown(method, calib):
                continue
            group = group.sort_values("ratio")
            x, y = list(group["ratio"]), list(group[column] * scale)
            if base_value is not None and 0.0 not in x:
                x, y = [0.0, *x], [reference if reference is not None else base_value, *y]
            kw = series.style(method, calib)
            ax.plot(x, y, label=series.label(method, calib), **kw)
            limited = group[group["limited"]]
            ax.scatter(limited["ratio"], limited[column] * scale, facecolors="white", edgecolors=kw["color"],
                       marker=kw["marker"], s=18, zorder=3)
        ax.set_title(model)
        ax.set_xlabel("ratio of routed experts removed")
        ax.set_ylabel(ylabel)
    shared_legend(fig, axes)
    return fig, series.note()


def accuracy_vs_ratio(table: pd.DataFrame, metric_text: str) -> Figure:
    """Average accuracy vs pruning ratio, a line per method, a panel per model."""
    fig, note = _ratio_lines(table, "accuracy", 100.0, "average accuracy (%)", None)
    return Figure("accuracy_vs_ratio", "Average accuracy vs pruning ratio",
                  f"Average accuracy ({metric_text}) vs the ratio of routed experts removed; dashed: unpruned."
                  + note, fig)


def recovery_vs_ratio(table: pd.DataFrame) -> Figure:
    """Recovery (% of the unpruned model's accuracy) vs pruning ratio."""
    fig, note = _ratio_lines(table, "recovery", 1.0, "recovery (% of unpruned)", 100.0)
    return Figure("recovery_vs_ratio", "Recovery vs pruning ratio",
                  "Average accuracy as a percentage of the unpruned model's, vs pruning ratio." + note, fig)


def speedup_vs_ratio(table: pd.DataFrame) -> Figure | Skipped:
    """Decode speedup over the unpruned model vs pruning ratio."""
    if table["decode_speedup"].notna().sum() == 0:
        return Skipped("speedup_vs_ratio", "Decode speedup vs ratio",
                       "no decode speed in the runs table (decode_tokens_per_s): the study ran without `measure`")
    fig, note = _ratio_lines(table, "decode_speedup", 1.0, "decode speedup (x unpruned)", 1.0)
    return Figure("speedup_vs_ratio", "Decode speedup vs pruning ratio",
                  "Decode tokens/s relative to the unpruned model (median of timed repetitions)." + note, fig)


def pareto_front(memory: list[float], accuracy: list[float]) -> list[int]:
    """Indices of the points no other point beats on both lower memory and higher accuracy, by memory."""
    order = sorted(range(len(memory)), key=lambda i: (memory[i], -accuracy[i]))
    front, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


def memory_pareto(table: pd.DataFrame) -> Figure | Skipped:
    """Peak memory (weights where not measured) vs average accuracy, with the Pareto front."""
    column = "peak_memory_bytes" if table["peak_memory_bytes"].notna().any() else "weight_bytes"
    data = table[table[column].notna() & table["accuracy"].notna()]
    if data.empty:
        return Skipped("memory_pareto", "Memory vs accuracy",
                       "no memory measurements or weight sizes in the runs table")
    div, unit = byte_unit(data[column])
    series, models = Series(table), sorted(data["model"].unique())
    fig, axes = panels(len(models))
    for ax, model in zip(axes, models, strict=False):
        part = data[data["model"] == model].reset_index(drop=True)
        mem, acc = list(part[column] / div), list(part["accuracy"] * 100)
        front = pareto_front(mem, acc)
        ax.step([mem[i] for i in front], [acc[i] for i in front], where="post", color="#999999", linewidth=1,
                label="Pareto front", zorder=1)
        for i, row in part.iterrows():
            if row["baseline"]:
                ax.scatter(mem[i], acc[i], color=style.REFERENCE_COLOUR, marker="*", s=50, label="unpruned", zorder=3)
                continue
            kw = series.style(row["method"], row["calib"])
            face = "white" if row["limited"] else kw["color"]
            ax.scatter(mem[i], acc[i], facecolors=face, edgecolors=kw["color"], marker=kw["marker"], s=22,
                       label=row["method"], zorder=2)
        ax.set_title(model)
        ax.set_xlabel(("peak memory" if column == "peak_memory_bytes" else "weights") + f" ({unit})")
        ax.set_ylabel("average accuracy (%)")
    shared_legend(fig, axes)
    what = "peak memory" if column == "peak_memory_bytes" else "weight bytes (no peak memory measured)"
    return Figure("memory_pareto", "Memory vs accuracy (Pareto front)",
                  f"Each cell's {what} vs average accuracy; the grey steps join the cells no other cell beats on both.",
                  fig)


def recovery_heatmap(table: pd.DataFrame) -> Figure | Skipped:
    """Recovery (%) per method (rows) and ratio (columns), a panel per model."""
    pruned = table[~table["baseline"] & table["recovery"].notna()]
    if pruned.empty:
        return Skipped("recovery_heatmap", "Recovery heatmap", "no pruned cell has a recovery (no unpruned cell?)")
    series, models = Series(table), sorted(pruned["model"].unique())
    lo, hi = float(pruned["recovery"].min()), max(100.0, float(pruned["recovery"].max()))
    fig, axes = panels(len(models), ncols=2, width=4.2, height=0.45 * pruned.groupby(["method", "calib"]).ngroups + 1.4)
    for ax, model in zip(axes, models, strict=False):
        part = pruned[pruned["model"] == model]
        keys = sorted(set(zip(part["method"], part["calib"], strict=True)))
        ratios = sorted(part["ratio"].unique())
        grid = np.full((len(keys), len(ratios)), np.nan)
        for r in part.itertuples(index=False):
            grid[keys.index((r.method, r.calib)), ratios.index(r.ratio)] = r.recovery
        image = ax.imshow(grid, cmap=style.SEQUENTIAL_CMAP, vmin=lo, vmax=hi, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                light = (value - lo) / max(hi - lo, 1e-9) > 0.6
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6,
                        color="black" if light else "white")
        ax.set_xticks(range(len(ratios)), [f"{r:.2f}" for r in ratios])
        ax.set_yticks(range(len(keys)), [series.label(m, c) for m, c in keys])
        ax.set_xlabel("ratio of routed experts removed")
        ax.set_title(model)
        ax.grid(False)
        fig.colorbar(image, ax=ax, label="recovery (%)")
    fig.tight_layout()
    return Figure("recovery_heatmap", "Recovery heatmap",
                  "Recovery (% of the unpruned model's average accuracy) per method and ratio.", fig)


def calibration_effect(effect: pd.DataFrame, table: pd.DataFrame) -> Figure | Skipped:
    """Domain minus generic calibration on each domain task, bars per method, a panel per model x ratio."""
    if effect.empty:
        return Skipped("calibration_effect", "Calibration-domain effect",
                       "no method and ratio has cells with both a generic (c4, testbed:mix) and a domain calibration")
    series = Series(table)
    keys = sorted(set(zip(effect["model"], effect["ratio"], strict=True)))
    fig, axes = panels(len(keys), ncols=2, width=4.2, height=2.6)
    many_generic = effect["generic_calib"].nunique() > 1
    for ax, (model, ratio) in zip(axes, keys, strict=False):
        part = effect[(effect["model"] == model) & (effect["ratio"] == ratio)]
        cats = sorted(set(zip(part["task"], part["generic_calib"], strict=True)))
        methods = sorted(part["method"].unique())
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            rows = part[part["method"] == method]
            xs = [cats.index((t, g)) + (k - (len(methods) - 1) / 2) * width
                  for t, g in zip(rows["task"], rows["generic_calib"], strict=True)]
            ax.bar(xs, rows["delta"], width=width, color=series.colour(method), label=method)
        ax.axhline(0, color=style.REFERENCE_COLOUR, linewidth=0.8)
        ax.set_xticks(range(len(cats)), [f"{t}\nvs {g}" if many_generic else t for t, g in cats],
                      rotation=30, ha="right")
        ax.set_ylabel("domain - generic (points)")
        ax.set_title(f"{model}, ratio {ratio:.2f}")
    shared_legend(fig, axes)
    return Figure("calibration_effect", "Calibration-domain effect",
                  "Score on each domain task with the domain's own calibration minus with generic calibration "
                  "(c4 / testbed:mix), in points; positive bars favour domain calibration.", fig)
