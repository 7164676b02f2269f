"""Figure scaffolding shared by every report figure: the drawn / skipped records, panel grids sized for
a paper's column (3.3 in) or page (6.9 in), and legends that sit below their panel, never on it.

A faceted figure is a grid of panels, each followed by a legend strip of its own (the series differ
from panel to panel); figures whose panels share their series take one strip below all panels.
Legends are laid out before drawing from the measured width of their text (`legend_layout`): as
many columns as fit the strip's width (a label too long for it is wrapped at its calibration or a
space), and strip heights follow from the resulting rows, so a legend never overlaps a plot, is
never taller than one and never runs past the figure's edge. Layout is matplotlib's constrained
layout: fixed inputs, fixed output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath

from moebench.report import style
from moebench.report.facets import primary_calibs

MAX_LINE_CALIBS = 2
LEGEND_ROW_IN = 0.16  # height of one legend row at 8 pt, inches
LEGEND_PT = 8.0  # legend text size (`style.RC`)
HANDLE_PAD_EM, BORDER_PAD_EM = 0.8, 0.4  # matplotlib's handletextpad and borderpad, in font sizes
LEGEND_SLACK_PT = 6.0  # kept free beside a legend: its strip's padding and rounding
MOST_PANEL_COLUMNS, MOST_SHARED_COLUMNS = 2, 4
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


@cache
def text_width_pt(text: str, size: float = LEGEND_PT) -> float:
    """Width in points of one line of ``text`` in the figures' font at ``size`` points."""
    prop = FontProperties(family=style.RC["font.family"], size=size)
    return max(TextToPath().get_text_width_height_descent(line, prop, ismath=False)[0] for line in text.split("\n"))


def _entry_pt(label: str) -> float:
    """Width of a legend entry: handle, gap and its widest line of text."""
    return (style.RC["legend.handlelength"] + HANDLE_PAD_EM) * LEGEND_PT + text_width_pt(label)


def wrap_label(label: str, width_in: float) -> str:
    """``label`` broken into lines that fit a legend column ``width_in`` wide: first before its
    calibration (`` [``), then at spaces; a single word wider than the column stays whole."""
    room = width_in * 72 - (style.RC["legend.handlelength"] + HANDLE_PAD_EM) * LEGEND_PT
    if text_width_pt(label) <= room:
        return label
    words = label.replace(" [", "\n[", 1).split("\n")
    lines = []
    for part in words:
        line = ""
        for word in part.split(" "):
            trial = f"{line} {word}" if line else word
            if line and text_width_pt(trial) > room:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return "\n".join(lines)


def _columns(labels: list[str], ncol: int) -> list[list[str]]:
    """The labels of each legend column, as matplotlib fills them (column by column, first ones longer)."""
    return [list(part) for part in np.array_split(np.array(labels, dtype=object), ncol) if len(part)]


def legend_width_pt(labels: list[str], ncol: int) -> float:
    """Width in points of a frameless legend of ``labels`` in ``ncol`` columns."""
    cols = _columns(labels, ncol)
    return (sum(max(_entry_pt(lab) for lab in col) for col in cols)
            + (len(cols) - 1) * style.RC["legend.columnspacing"] * LEGEND_PT + 2 * BORDER_PAD_EM * LEGEND_PT)


def legend_layout(labels: list[str], width_in: float, most: int) -> tuple[int, list[str], float]:
    """(columns, wrapped labels, height in inches) of a legend of ``labels`` in a strip ``width_in``
    wide: the most columns, up to ``most``, that fit; labels wrapped to fit one column when even one
    does not fit as they are."""
    if not labels:
        return 1, [], 0.0
    room = width_in * 72 - LEGEND_SLACK_PT
    ncol = next((k for k in range(min(most, len(labels)), 1, -1) if legend_width_pt(labels, k) <= room), 1)
    wrapped = labels if ncol > 1 else [wrap_label(lab, room / 72 - 2 * BORDER_PAD_EM * LEGEND_PT / 72)
                                       for lab in labels]
    lines = max(sum(lab.count("\n") + 1 for lab in col) for col in _columns(wrapped, ncol))
    return ncol, wrapped, lines * LEGEND_ROW_IN + 0.05


def legend_height(labels: list[str], width_in: float, most: int) -> float:
    """Inches a legend of ``labels`` needs in a strip ``width_in`` wide with at most ``most`` columns."""
    return legend_layout(labels, width_in, most)[2]


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
    fits = [legend_layout(lab, width / ncols, MOST_PANEL_COLUMNS) for lab in labels]
    ncol_legend = [f[0] for f in fits]
    strips = [max(fits[i][2] for i in range(r * ncols, min(n, (r + 1) * ncols))) for r in range(nrows)]
    bottom = legend_height(common, width, max(1, len(common)))
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
    ncol_legend, _, strip = legend_layout(labels, width, MOST_SHARED_COLUMNS)
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
    ``only`` those) as one legend in ``lax``, in at most ``ncol`` columns: as many as fit the strip's
    width (`legend_layout`, the same rule that sized the strip), labels wrapped where one column is
    too narrow."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles and lab not in leave_out and (only is None or lab in only):
                handles[lab] = h
                labels.append(lab)
    if labels:
        ncol, shown, _ = legend_layout(labels, strip_width(lax), ncol)
        lax.legend([handles[lab] for lab in labels], shown, loc="upper center", bbox_to_anchor=(0.5, 1.0),
                   ncol=ncol, borderaxespad=0.0, labelspacing=0.3)


def strip_width(lax) -> float:
    """Width in inches of the grid cells a legend axes ``lax`` spans (its share of the figure's width)."""
    spec = lax.get_subplotspec()
    return lax.figure.get_size_inches()[0] * len(spec.colspan) / spec.get_gridspec().ncols
