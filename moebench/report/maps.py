"""Figures from the optional data: per-token latency vs input length (``latency`` table) and
kept-expert maps per layer (``cells/<id>/plan.json``).

Latency table (``<study>/tables/latency.{csv,parquet}``), one row per cell x prompt length x batch:
``cell``, ``prompt_len`` (input tokens per sequence), ``batch`` (sequences), ``ms_per_token``
(median milliseconds per decode step, i.e. per generated token of each sequence); optional
``ms_per_token_p90``, ``new_tokens``, ``prefill_ms``. The figure uses the smallest batch measured.

Kept-expert maps use ``keep`` (MoE layer -> kept expert ids) of each plan, and for input-aware
methods ``extra.keep_frequency`` (layer -> per-expert fraction of inputs that kept the expert).
The expert count per layer is ``extra.n_experts`` (an int, or layer -> int) when a plan has it,
else one more than the largest expert id any plan of that model keeps. A map is drawn for every
(model, method) with a non-uniform plan (kept counts differ between layers) or an input-aware one
(plan ``kind`` ``select`` or ``keep_frequency`` present).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap

from moebench.report import style
from moebench.report.figures import Figure, Series, Skipped, panels, shared_legend
from moebench.report.tables import LATENCY_COLUMNS

MAX_MAP_CALIBS = 4  # rows of panels per kept-expert map
LATENCY_NOTE = ("no latency table: the grid writes tables/latency.csv (cell, prompt_len, batch, ms_per_token) "
                "when it measures decode latency at several prompt lengths")


def latency_vs_input(latency: pd.DataFrame | None, table: pd.DataFrame) -> Figure | Skipped:
    """Per-token decode latency vs prompt length, a line per ratio, a panel per model x method."""
    title = "Per-token latency vs input length"
    if latency is None or latency.empty:
        return Skipped("latency_vs_input", title, LATENCY_NOTE)
    missing = [c for c in LATENCY_COLUMNS if c not in latency.columns]
    if missing:
        return Skipped("latency_vs_input", title, f"the latency table lacks columns {missing}")
    lat = latency.assign(cell=latency["cell"].astype(str)).merge(
        table[["cell", "model", "method", "calib", "ratio", "baseline"]], on="cell")
    lat = lat[lat["batch"] == lat.groupby("model")["batch"].transform("min")]
    series = Series(table)
    pruned = lat[~lat["baseline"]]
    keys = sorted(k for k in set(zip(pruned["model"], pruned["method"], pruned["calib"], strict=True))
                  if series.shown(*k[1:]))
    keys = keys or sorted({(m, "unpruned", "") for m in lat["model"]})
    ratios = sorted(r for r in lat["ratio"].unique() if r > 0)
    fig, axes = panels(len(keys))
    for ax, (model, method, calib) in zip(axes, keys, strict=False):
        part = lat[lat["model"] == model]
        base = part[part["baseline"]].sort_values("prompt_len")
        if len(base):
            ax.plot(base["prompt_len"], base["ms_per_token"], color=style.REFERENCE_COLOUR, marker="*",
                    linewidth=1.3, markersize=5, label="unpruned")
        for k, ratio in enumerate(ratios):
            rows = part[(part["method"] == method) & (part["calib"] == calib) & (part["ratio"] == ratio)]
            rows = rows.sort_values("prompt_len")
            if len(rows):
                ax.plot(rows["prompt_len"], rows["ms_per_token"], label=f"ratio {ratio:.2f}",
                        **style.series_style(k))
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}\n{series.label(method, calib)}" if method != "unpruned" else model)
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("decode latency (ms / token)")
    shared_legend(fig, axes)
    batch = int(lat["batch"].min())
    return Figure("latency_vs_input", title, f"Median decode latency per generated token vs prompt length at "
                  f"batch {batch}, one line per pruning ratio; black: unpruned." + series.note(), fig)


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


def kept_expert_maps(plans: dict, table: pd.DataFrame) -> list[Figure] | Skipped:
    """One map per (model, method) whose plans are non-uniform or input-aware; panels per ratio/calib."""
    title = "Kept-expert maps"
    if not plans:
        return Skipped("kept_experts", title, "no plan.json in the cell folders (cells/<id>/plan.json)")
    rows = table[~table["baseline"] & table["cell"].isin(plans)]
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
        fig, axes = panels(len(cells), ncols=ratios if ratios > 1 else min(4, len(cells)), width=2.4, height=2.6)
        for ax, cell in zip(axes, cells, strict=False):
            row = group[group["cell"] == cell].iloc[0]
            layers, grid, freq = keep_matrix(plans[cell], n_experts)
            cmap = style.SEQUENTIAL_CMAP if freq else ListedColormap(["#FFFFFF", style.OKABE_ITO["blue"]])
            ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            step = max(1, len(layers) // 16)
            ax.set_yticks(range(0, len(layers), step), [str(v) for v in layers[::step]])
            ax.set_xlabel("expert id")
            ax.set_ylabel("MoE layer")
            ax.grid(False)
            counts = (grid > 0).sum(axis=1)
            calib = f", {row['calib']}" if row["calib"] else ""
            ax.set_title(f"ratio {row['ratio']:.2f}{calib}\nkept {int(counts.min())}-{int(counts.max())}/layer")
        fig.suptitle(f"{model}: {method}")
        fig.tight_layout()
        out.append(Figure(f"kept_experts_{slug(model)}_{slug(method)}", f"Kept experts: {method} on {model}",
                          "Kept (blue) and removed (white) experts per MoE layer; shaded by the fraction of "
                          "inputs keeping each expert for input-aware methods."
                          + (f" Calibrations shown: {', '.join(shown)} of {len(calibs)}." if len(calibs) > len(shown)
                             else ""), fig))
    if not out:
        return Skipped("kept_experts", title, "every plan keeps the same number of experts in each layer and none "
                       "is input-aware (maps are drawn for non-uniform and input-aware methods only)")
    return out
