"""Figure scaffolding shared by every report figure: the drawn / skipped records, panel grids sized for
a paper's column (3.3 in) or page (6.9 in), and legends that sit below their panel, never on it.

A faceted figure is a grid of panels, each followed by a legend strip of its own (the series differ
from panel to panel); figures whose panels share their series take one strip below all panels.
Strip heights are computed from the number of legend rows, so a legend never overlaps a plot and is
never taller than one. Layout is matplotlib's constrained layout: fixed inputs, fixed output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import pandas as pd

from moebench.report import style
from moebench.report.facets import primary_calibs

MAX_LINE_CALIBS = 2
LEGEND_ROW_IN = 0.16  # height of one legend row at 8 pt, inches
PANEL_DECOR_IN = 0.75  # title (up to two lines), tick labels and axis label of a panel, inches


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
    """Which calibration sources line figures draw.

    Every source is drawn when a study has at most `MAX_LINE_CALIBS`; beyond that, each method's
    primary source only (generic ``testbed:mix`` / ``c4`` where it has one, else its first), so
    panels stay readable; tables and the calibration-effect figure cover the rest.
    """

    def __init__(self, table: pd.DataFrame):
        pruned = table[~table["baseline"]]
        self.calibs = sorted(c for c in pruned["calib"].unique() if c)
        self.primary = primary_calibs(table)
        self.all_calibs = len(self.calibs) <= MAX_LINE_CALIBS

    def shown(self, method: str, calib: str) -> bool:
        """Whether line figures draw the series (see the class docstring)."""
        return self.all_calibs or calib == self.primary.get(method)

    def note(self) -> str:
        """Caption sentence saying which calibrations the lines show."""
        return "" if self.all_calibs else (" Lines show each method's primary calibration (testbed:mix or c4 where "
                                           "used); the tables and the calibration-effect figure cover the others.")


def columns_for(n: int) -> int:
    """Panel columns for ``n`` panels: one, two (2 or 4 panels) or three."""
    return 1 if n == 1 else 2 if n in (2, 4) else 3


def width_for(ncols: int) -> float:
    """A one-column figure for one panel, a full-width one otherwise."""
    return style.ONE_COLUMN if ncols == 1 else style.TWO_COLUMN


def legend_columns(labels: list[str], width_in: float) -> int:
    """Two legend columns when the labels fit side by side in ``width_in`` (8 pt: ~0.065 in a character)."""
    longest = max((len(lab) for lab in labels), default=0)
    return 2 if 2 * (longest * 0.065 + 0.45) <= width_in else 1


def legend_height(n_labels: int, ncol: int) -> float:
    """Inches a legend of ``n_labels`` entries in ``ncol`` columns needs."""
    return math.ceil(n_labels / max(ncol, 1)) * LEGEND_ROW_IN + 0.05 if n_labels else 0.0


def facet_grid(labels: list[list[str]], common: list[str], plot_h: float = 1.45, ncols: int | None = None,
               share: bool = True):
    """Panels with a legend strip below each (``labels[i]``: panel i's own entries), then one strip
    below all panels for the ``common`` entries (the unpruned line, the random band).

    Returns ``(fig, axes, legend_axes, legend_ncols, common_axes)``; legend axes have no axis lines.
    With ``share``, panels share both axes and only the outer ones carry axis labels.
    """
    n = len(labels)
    ncols = ncols or columns_for(n)
    nrows = math.ceil(n / ncols)
    width = width_for(ncols)
    ncol_legend = [legend_columns(lab, width / ncols) for lab in labels]
    strips = [max(legend_height(len(labels[i]), ncol_legend[i]) for i in range(r * ncols, min(n, (r + 1) * ncols)))
              for r in range(nrows)]
    bottom = legend_height(len(common), len(common))
    fig = plt.figure(figsize=(width, nrows * (plot_h + PANEL_DECOR_IN) + sum(strips) + bottom), layout="constrained")
    ratios = [x for r in range(nrows) for x in (plot_h, max(strips[r], 0.01))] + [max(bottom, 0.01)]
    grid = fig.add_gridspec(2 * nrows + 1, ncols, height_ratios=ratios)
    axes, legend_axes = [], []
    for i in range(n):
        r, c = divmod(i, ncols)
        first = axes[0] if axes and share else None
        axes.append(fig.add_subplot(grid[2 * r, c], sharex=first, sharey=first))
        lax = fig.add_subplot(grid[2 * r + 1, c])
        lax.axis("off")
        legend_axes.append(lax)
    common_ax = fig.add_subplot(grid[2 * nrows, :])
    common_ax.axis("off")
    return fig, axes, legend_axes, ncol_legend, common_ax


def outer_labels(axes, ncols: int, xlabel: str, ylabel: str, shared: bool = True) -> None:
    """Axis labels on the outer panels only when the panels share axes (tick labels stay on every
    panel, each is read alone), on every panel otherwise."""
    for i, ax in enumerate(axes):
        below = i + ncols >= len(axes)
        ax.set_xlabel(xlabel if below or not shared else "")
        ax.set_ylabel(ylabel if i % ncols == 0 or not shared else "")


def panel_legend(ax, lax, ncol: int, leave_out: tuple = ()) -> None:
    """``ax``'s labelled artists (each label once, first seen first, less ``leave_out``) as a legend
    at the top of its strip ``lax``."""
    shared_legend([ax], lax, ncol, leave_out)


def shared_grid(n: int, labels: list[str], plot_h: float = 1.3, ncols: int | None = None, sharey: bool = False,
                sharex: bool = False):
    """Panels sharing one legend strip below them all; returns ``(fig, axes, legend_axes, legend_ncol)``."""
    ncols = ncols or columns_for(n)
    nrows = math.ceil(n / ncols)
    width = width_for(ncols)
    ncol_legend = min(4, len(labels)) if legend_columns(labels, width / 2) == 2 else 2
    strip = legend_height(len(labels), ncol_legend)
    fig = plt.figure(figsize=(width, nrows * (plot_h + PANEL_DECOR_IN) + strip), layout="constrained")
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[plot_h] * nrows + [max(strip, 0.01)])
    axes = []
    for i in range(n):
        r, c = divmod(i, ncols)
        share = axes[0] if axes and sharey else None
        axes.append(fig.add_subplot(grid[r, c], sharex=axes[0] if axes and sharex else None, sharey=share))
    lax = fig.add_subplot(grid[nrows, :])
    lax.axis("off")
    return fig, axes, lax, ncol_legend


def shared_legend(axes, lax, ncol: int, leave_out: tuple = (), only: tuple | None = None) -> None:
    """The labelled artists of all ``axes`` (deduplicated, first seen first; less ``leave_out``, or
    ``only`` those) as one legend in ``lax``."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles and lab not in leave_out and (only is None or lab in only):
                handles[lab] = h
                labels.append(lab)
    if labels:
        lax.legend([handles[lab] for lab in labels], labels, loc="upper center", bbox_to_anchor=(0.5, 1.0),
                   ncol=ncol, borderaxespad=0.0, labelspacing=0.3)
