"""Figures from the optional data: per-token latency vs input length (``latency`` table) and
kept-expert maps per layer (``cells/<id>/plan.json``).

Latency table (``<study>/tables/latency.{csv,parquet}``), one row per cell x prompt length x batch:
``cell``, ``prompt_len`` (input tokens per sequence), ``batch`` (sequences), ``ms_per_token``
(median milliseconds per decode step, i.e. per generated token of each sequence); optional
``ms_per_token_p10``, ``ms_per_token_p90`` (the spread shaded around each line), ``new_tokens``,
``prefill_ms``. The figure uses the smallest batch measured. Its lines stand for ratios, drawn in shades
of the sequential ``cividis`` map (`style.ratio_looks`), so they never take a method's colour.

Kept-expert maps use ``keep`` (MoE layer -> kept expert ids) of each plan, and for input-aware
methods ``extra.keep_frequency`` (layer -> per-expert fraction of inputs that kept the expert).
The expert count per layer is ``extra.n_experts`` (an int, or layer -> int) when a plan has it,
else one more than the largest expert id any plan of that model keeps. A map is drawn for every
(model, method) with a non-uniform plan (kept counts differ between layers) or an input-aware one
(plan ``kind`` ``select`` or ``keep_frequency`` present). A recovered cell (trained after its method)
keeps its twin's experts, so it has no map of its own where its twin is in the study.
"""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.ticker import NullLocator

from moebench.report import style
from moebench.report.facets import BAND, FACETS
from moebench.report.layout import Figure, Series, Skipped, outer_labels, shared_grid, shared_legend, width_for
from moebench.report.tables import LATENCY_COLUMNS, twins

MAX_MAP_CALIBS = 4  # rows of panels per kept-expert map
LATENCY_NOTE = ("no latency table: the grid writes tables/latency.csv (cell, prompt_len, batch, ms_per_token) "
                "when it measures decode latency at several prompt lengths")


def _latency_band(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series, str] | None:
    """(fast end, slow end, spread name) of the per-token latency: p10-p90, else median to p90."""
    if "ms_per_token_p90" not in rows or rows["ms_per_token_p90"].isna().all():
        return None
    slow = rows["ms_per_token_p90"].fillna(rows["ms_per_token"])
    if "ms_per_token_p10" in rows and rows["ms_per_token_p10"].notna().all():
        return rows["ms_per_token_p10"], slow, "p10-p90"
    return rows["ms_per_token"], slow, "median to p90"


def _latency_line(ax, rows: pd.DataFrame, label: str, kw: dict, spreads: set) -> None:
    rows = rows.sort_values("prompt_len")
    ax.plot(rows["prompt_len"], rows["ms_per_token"], label=label, **kw)
    band = _latency_band(rows)
    if band is not None:
        spreads.add(band[2])
        ax.fill_between(rows["prompt_len"], band[0], band[1], color=kw["color"], alpha=0.2, linewidth=0)


def latency_vs_input(latency: pd.DataFrame | None, table: pd.DataFrame) -> Figure | Skipped:
    """Per-token decode latency vs prompt length, a line per ratio with its spread, a panel per model x method."""
    title = "Per-token latency vs input length"
    if latency is None or latency.empty:
        return Skipped("latency_vs_input", title, LATENCY_NOTE)
    missing = [c for c in LATENCY_COLUMNS if c not in latency.columns]
    if missing:
        return Skipped("latency_vs_input", title, f"the latency table lacks columns {missing}")
    lat = latency.assign(cell=latency["cell"].astype(str)).merge(
        table[["cell", "model", "method", "calib", "ratio", "baseline", "facet"]], on="cell")
    lat = lat[lat["batch"] == lat.groupby("model")["batch"].transform("min")]
    series = Series(table)
    pruned = lat[~lat["baseline"] & (lat["facet"] != BAND)]  # random's latency is any static method's
    order = list(FACETS)
    keys = sorted({k for k in zip(pruned["model"], pruned["facet"], pruned["method"], pruned["calib"], strict=True)
                   if series.shown(*k[2:])}, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99, k[2:]))
    keys = [(m, meth, c) for m, _, meth, c in keys] or sorted({(m, "unpruned", "") for m in lat["model"]})
    ratios = sorted(r for r in lat["ratio"].unique() if r > 0)
    twice = pd.Series([k[1] for k in keys]).value_counts().to_dict()
    labels = ["unpruned"] + [f"ratio {r:.2f}" for r in ratios]
    looks = style.ratio_looks(ratios)  # shades of one sequential map: a ratio never looks like a method
    fig, axes, lax, ncol = shared_grid(len(keys), labels, plot_h=1.05, ncols=min(4, max(1, len(keys))), sharey=True,
                                       sharex=True)
    spreads = set()
    for ax, (model, method, calib) in zip(axes, keys, strict=True):
        part = lat[lat["model"] == model]
        base = part[part["baseline"]]
        if len(base):
            _latency_line(ax, base, "unpruned", {"color": style.REFERENCE_COLOUR, "marker": "*", "linewidth": 1.2,
                                                 "markersize": 4}, spreads)
        for ratio in ratios:
            rows = part[(part["method"] == method) & (part["calib"] == calib) & (part["ratio"] == ratio)]
            if len(rows):
                _latency_line(ax, rows, f"ratio {ratio:.2f}", looks[ratio].line(), spreads)
        ax.set_xscale("log", base=2)
        name = f"{method} [{calib}]" if calib and twice.get(method, 0) > 1 else method
        ax.set_title(style.text(f"{model}: {name}" if lat["model"].nunique() > 1 else name), fontsize=8)
    lengths = sorted(int(v) for v in lat["prompt_len"].unique())
    axes[0].set_xticks(lengths, [str(v) for v in lengths])
    axes[0].xaxis.set_minor_locator(NullLocator())
    outer_labels(axes, min(4, max(1, len(keys))), "input length (tokens)", "decode ms / token")
    shared_legend(axes, lax, ncol)
    batch = int(lat["batch"].min())
    spread = ("shaded: p10-p90 of the repetitions" if spreads == {"p10-p90"} else
              "shaded: from the median to the p90 of the repetitions (no p10 recorded)" if spreads else
              "no spread recorded")
    return Figure("latency_vs_input", title, f"Median decode latency per generated token vs prompt length at "
                  f"batch {batch}, one line per pruning ratio (darker: fewer experts removed); black: unpruned; "
                  f"{spread}. A panel per method, grouped by kind, on shared axes; random pruning is left out (its "
                  "latency is that of any static method at the same ratio: see tables/latency.csv)." + series.note(),
                  fig)


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def _is_mapped(plan: dict) -> bool:
    counts = {len(ids) for ids in (plan.get("keep") or {}).values()}
    extra = plan.get("extra") or {}
    return len(counts) > 1 or plan.get("kind") == "select" or "keep_frequency" in extra


def _expert_count(plans: list[dict]) -> int:
    counts = []
    for plan in plans:
        n = (plan.get("extra") or {}).get("n_experts")
        if isinstance(n, dict):
            counts += [int(v) for v in n.values()]
        elif n is not None:
            counts.append(int(n))
        counts += [max(ids) + 1 for ids in (plan.get("keep") or {}).values() if ids]
        counts += [len(f) for f in ((plan.get("extra") or {}).get("keep_frequency") or {}).values()]
    return max(counts) if counts else 0


def keep_matrix(plan: dict, n_experts: int) -> tuple[list[int], np.ndarray, bool]:
    """(layers, matrix [layers, experts] of 1/0 kept or keep frequency, whether it is a frequency)."""
    freq = (plan.get("extra") or {}).get("keep_frequency")
    source = freq if freq else plan.get("keep") or {}
    layers = sorted(int(k) for k in source)
    grid = np.zeros((len(layers), n_experts))
    for row, layer in enumerate(layers):
        values = source.get(str(layer), source.get(layer))
        if freq:
            grid[row, :len(values)] = values
        else:
            grid[row, list(values)] = 1.0
    return layers, grid, bool(freq)


def _map_title(row, grid: np.ndarray, freq: bool) -> str:
    calib = f", {row['calib']}" if row["calib"] else ""
    if freq:  # the frequencies of a layer sum to the mean number of experts an input keeps there
        lo, hi = f"{grid.sum(axis=1).min():.1f}", f"{grid.sum(axis=1).max():.1f}"
        return f"ratio {row['ratio']:.2f}{calib}\nan input keeps {lo if lo == hi else lo + '-' + hi} / layer"
    lo, hi = str(int((grid > 0).sum(axis=1).min())), str(int((grid > 0).sum(axis=1).max()))
    return f"ratio {row['ratio']:.2f}{calib}\nkept {lo if lo == hi else lo + '-' + hi} / layer"


def _colour_bar(fig, axes, image, freq: bool) -> None:
    """A colour bar saying what the shades mean: kept / removed, or the fraction of inputs keeping an expert."""
    if freq:
        bar = fig.colorbar(image, ax=axes, ticks=[0, 0.5, 1], shrink=0.95, aspect=15)
        bar.ax.set_yticklabels(["0: never", "0.5", "1: always"])
        bar.set_label("fraction of inputs\nkeeping the expert")
    else:
        bar = fig.colorbar(image, ax=axes, ticks=[0, 1], shrink=0.6, aspect=10)
        bar.ax.set_yticklabels(["0: removed", "1: kept"])
        bar.set_label("in the plan")


def _draw_map(plans: dict, group: pd.DataFrame, cells: list[str], n_experts: int, ncols: int):
    nrows = -(-len(cells) // ncols)
    layers_max = max(len(keep_matrix(plans[c], n_experts)[0]) for c in cells)
    plot_h = min(2.2, max(1.2, 0.16 * layers_max))
    fig = plt.figure(figsize=(width_for(ncols if len(cells) > 1 else 1), nrows * (plot_h + 0.75) + 0.2),
                     layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    image, any_freq = None, False
    for ax, cell in zip(axes, cells, strict=False):
        row = group[group["cell"] == cell].iloc[0]
        layers, grid, freq = keep_matrix(plans[cell], n_experts)
        any_freq |= freq
        if freq:
            image = ax.imshow(grid, cmap=style.SEQUENTIAL_CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        else:  # two colours, each tick of the colour bar at the middle of its colour
            image = ax.imshow(grid, cmap=ListedColormap(["#FFFFFF", style.OKABE_ITO["blue"]]), aspect="auto",
                              norm=BoundaryNorm([-0.5, 0.5, 1.5], 2), interpolation="nearest")
        for side in ("top", "right"):
            ax.spines[side].set_visible(True)
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [str(v) for v in layers[::step]])
        ax.set_xticks(range(0, n_experts, max(1, n_experts // 8)))
        ax.set_xlabel("expert id")
        ax.set_ylabel("MoE layer")
        ax.grid(False)
        ax.set_title(style.text(_map_title(row, grid, freq)), fontsize=8)
    for ax in axes[len(cells):]:
        ax.set_visible(False)
    _colour_bar(fig, axes[:len(cells)], image, any_freq)
    return fig, any_freq


def kept_expert_maps(plans: dict, table: pd.DataFrame) -> list[Figure] | Skipped:
    """One map per (model, method) whose plans are non-uniform or input-aware; panels per ratio/calib."""
    title = "Kept-expert maps"
    if not plans:
        return Skipped("kept_experts", title, "no plan.json in the cell folders (cells/<id>/plan.json)")
    rows = table[~table["baseline"] & table["cell"].isin(plans)]
    pairs = twins(rows)  # a recovered cell keeps its twin's experts: its map would repeat the twin's
    rows = rows[rows["cell"].map(lambda c: not pairs.get(c)).astype(bool)]
    out = []
    for (model, method), group in rows.groupby(["model", "method"], sort=True):
        if not any(_is_mapped(plans[c]) for c in group["cell"]):
            continue
        calibs = sorted(set(group["calib"]), key=lambda c: (c not in ("testbed:mix", "c4"), c))
        shown = calibs[:MAX_MAP_CALIBS]
        group = group[group["calib"].isin(shown)]
        cells = list(group.sort_values(["calib", "ratio"])["cell"])
        ratios = group["ratio"].nunique()
        n_experts = _expert_count([plans[c] for c in table.loc[table["model"] == model, "cell"] if c in plans])
        fig, freq = _draw_map(plans, group, cells, n_experts, ratios if ratios > 1 else min(4, len(cells)))
        what = ("Shade: the fraction of inputs whose selection kept each expert (0 = never kept, 1 = kept for "
                "every input); the titles give the mean number of experts an input keeps per layer."
                if freq else "Blue (1): the expert is kept; white (0): removed; titles give the kept count per layer.")
        out.append(Figure(f"kept_experts_{slug(model)}_{slug(method)}", f"Kept experts: {method} on {model}",
                          f"Kept experts per MoE layer (rows) and expert id (columns), a panel per ratio. {what}"
                          + (f" Calibrations shown: {', '.join(shown)} of {len(calibs)}." if len(calibs) > len(shown)
                             else ""), fig))
    if not out:
        return Skipped("kept_experts", title, "every plan keeps the same number of experts in each layer and none "
                       "is input-aware (maps are drawn for non-uniform and input-aware methods only)")
    return out
