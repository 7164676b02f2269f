"""Per-method grids: the recovery heat map (method x ratio, colour bar in percent) and the
calibration-domain effect (domain minus generic calibration per domain task, with 95% intervals).

Rows of the heat map follow the facet order of `moebench.report.facets` (static scores, search,
global budgets, input-aware, merging, skipping, then random), separated by white rules; its colour
bar lies below the panels, so its label has the figure's width however few rows there are. The
calibration-effect bars take each method's colour and a hatch of the report's `style.MethodStyles`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moebench.report import facets, style
from moebench.report.layout import Figure, Skipped, columns_for, outer_labels, shared_grid, shared_legend
from moebench.report.uncertainty import Z95

ROW_IN = 0.17  # inches per heat-map row (8 pt numbers)
BAR_IN = 0.55  # the horizontal colour bar below the panels, with its ticks and label


def _row_order(part: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(facet, method, calib) rows of the heat map, by facet order then name."""
    order = [*facets.FACETS, facets.BAND]
    keys = set(zip(part["facet"], part["method"], part["calib"], strict=True))
    return sorted(keys, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1], k[2]))


def recovery_heatmap(table: pd.DataFrame) -> Figure | Skipped:
    """Recovery (%) per method (rows) and ratio (columns), a panel per model, with a colour bar."""
    pruned = table[~table["baseline"] & table["recovery"].notna()]
    if pruned.empty:
        return Skipped("recovery_heatmap", "Recovery heatmap", "no pruned cell has a recovery (no unpruned cell?)")
    models = sorted(pruned["model"].unique())
    lo, hi = float(pruned["recovery"].min()), max(100.0, float(pruned["recovery"].max()))
    ncols = min(2, len(models))
    rows = max(len(_row_order(pruned[pruned["model"] == m])) for m in models)
    fig = plt.figure(figsize=(style.TWO_COLUMN, rows * ROW_IN * -(-len(models) // ncols) + 1.0 + BAR_IN),
                     layout="constrained")
    several = pruned.groupby("method")["calib"].nunique().to_dict()
    axes = fig.subplots(-(-len(models) // ncols), ncols, squeeze=False).flat
    image = None
    for ax, model in zip(axes, models, strict=False):
        part = pruned[pruned["model"] == model]
        keys = _row_order(part)
        ratios = sorted(part["ratio"].unique())
        grid = np.full((len(keys), len(ratios)), np.nan)
        for r in part.itertuples(index=False):
            grid[keys.index((r.facet, r.method, r.calib)), ratios.index(r.ratio)] = r.recovery
        image = ax.imshow(grid, cmap=style.SEQUENTIAL_CMAP, vmin=lo, vmax=hi, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                light = (value - lo) / max(hi - lo, 1e-9) > 0.6
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if light else "white")
        for i in range(1, len(keys)):
            if keys[i][0] != keys[i - 1][0]:
                ax.axhline(i - 0.5, color="white", linewidth=2.0)
        ax.set_xticks(range(len(ratios)), [f"{r:.2f}" for r in ratios])
        ax.set_yticks(range(len(keys)),
                      [style.text(f"{m} [{c}]" if c and several.get(m, 0) > 1 else m) for _, m, c in keys])
        ax.tick_params(length=0)
        ax.set_xlabel("fraction of experts removed")
        ax.set_title(style.text(model))
        ax.grid(False)
    for ax in list(axes)[len(models):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=fig.axes[:len(models)], label="recovery (% of unpruned accuracy)", location="bottom",
                 shrink=0.5, aspect=40, pad=0.05)
    return Figure("recovery_heatmap", "Recovery heatmap",
                  "Recovery (% of the unpruned model's average accuracy) per method and ratio; rows grouped by kind "
                  "of method (white rules between groups); a calibration source is named where a method ran with "
                  "several.", fig)


def calibration_effect(effect: pd.DataFrame, table: pd.DataFrame,
                       styles: style.MethodStyles | None = None) -> Figure | Skipped:
    """Domain minus generic calibration on each domain task, bars per method (the report's ``styles``)
    with 95% intervals, a panel per model x ratio."""
    if effect.empty:
        return Skipped("calibration_effect", "Calibration-domain effect",
                       "no method and ratio has cells with both a generic (c4, testbed:mix) and a domain calibration")
    keys = sorted(set(zip(effect["model"], effect["ratio"], strict=True)))
    methods = sorted(effect["method"].unique())
    styles = style.report_styles(table, effect) if styles is None else styles
    ncols = min(3, columns_for(len(keys)))
    fig, axes, lax, ncol = shared_grid(len(keys), methods, plot_h=1.45, ncols=ncols, sharey=True)
    many_generic = effect["generic_calib"].nunique() > 1
    for ax, (model, ratio) in zip(axes, keys, strict=True):
        part = effect[(effect["model"] == model) & (effect["ratio"] == ratio)]
        cats = sorted(set(zip(part["task"], part["generic_calib"], strict=True)))
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            rows = part[part["method"] == method]
            xs = [cats.index((t, g)) + (k - (len(methods) - 1) / 2) * width
                  for t, g in zip(rows["task"], rows["generic_calib"], strict=True)]
            err = (Z95 * rows["delta_stderr"]).fillna(0.0)
            ax.bar(xs, rows["delta"], width=width, label=style.text(method), yerr=err,
                   error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": style.REFERENCE_COLOUR},
                   **styles[method].bar())
        ax.axhline(0, color=style.REFERENCE_COLOUR, linewidth=0.8)
        ax.set_xticks(range(len(cats)), [style.text(f"{t}\nvs {g}" if many_generic else t) for t, g in cats])
        ax.set_title(style.text(f"{model}, ratio {ratio:.2f}" if effect["model"].nunique() > 1
                                else f"ratio {ratio:.2f}"))
    outer_labels(axes, ncols, "", "domain - generic (points)")
    shared_legend(axes, lax, ncol)
    tests = set(effect["delta_test"])
    how = ("paired over the task's items" if tests == {"paired"} else
           "from the two cells' stderrs (no per-item results)" if tests == {"stderr"} else
           "paired where both cells have per-item results, else from their stderrs")
    return Figure("calibration_effect", "Calibration-domain effect",
                  "Score on each domain task with the domain's own calibration minus with generic calibration "
                  f"(c4 / testbed:mix), in points; positive bars favour domain calibration; error bars: 95% interval, "
                  f"{how}.", fig)
