"""One place for how figures look and how they are written: palette, fonts, byte-stable saving.

Colours are the Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design"), distinguishable
under the common colour-vision deficiencies; markers and line styles repeat the distinction so
figures also read in greyscale. A panel holds at most six series, so each gets its own colour
(`PANEL_COLOURS`: Okabe-Ito without black, kept for the unpruned reference, and yellow, too faint on
white). Figures are drawn at the widths of a paper's column (`ONE_COLUMN`, 3.3 in) or page
(`TWO_COLUMN`, 6.9 in) with 8-9 pt text, and saved at exactly that size. Fonts are embedded as
TrueType (Type 42), never Type 3, which conference submission systems reject. Files carry no
creation dates or software stamps, so rendering the same tables twice gives identical bytes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from moebench.util import atomic_write

# Okabe-Ito, black first (kept for the unpruned reference), then in their published order.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}
# Colours of the series of one panel, in order (at most six series a panel: no colour twice).
PANEL_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
REFERENCE_COLOUR = OKABE_ITO["black"]
BAND_COLOUR = "#B0B0B0"  # the random-seed band and other context drawn behind the series
ONE_COLUMN, TWO_COLUMN = 3.3, 6.9  # inches: a paper's column and its full text width
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]
SEQUENTIAL_CMAP = "cividis"  # perceptually uniform and colour-blind safe

RC = {
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "svg.hashsalt": "moebench",
    "font.family": "DejaVu Sans", "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8,
    "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 9,
    "legend.handlelength": 2.0, "legend.columnspacing": 1.0, "legend.borderaxespad": 0.2, "legend.frameon": False,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
    "savefig.dpi": 300, "path.simplify": False, "image.interpolation": "nearest",
    "figure.constrained_layout.h_pad": 0.03, "figure.constrained_layout.w_pad": 0.03,
}
PDF_METADATA = {"CreationDate": None, "ModDate": None}
PNG_METADATA = {"Software": None}


@contextmanager
def figure_style():
    """Matplotlib settings of every moebench figure, restored afterwards."""
    with matplotlib.rc_context(RC):
        yield


def series_style(index: int, variant: int = 0) -> dict:
    """Line/marker keywords for series ``index`` of a panel (colour and marker) and ``variant`` (line style)."""
    return {"color": PANEL_COLOURS[index % len(PANEL_COLOURS)], "marker": MARKERS[index % len(MARKERS)],
            "linestyle": LINESTYLES[variant % len(LINESTYLES)], "markersize": 4, "linewidth": 1.3}


def text(value) -> str:
    """``value`` as literal figure text: a ``$`` in a model or method name never starts mathtext."""
    return str(value).replace("$", r"\$")


def save_figure(fig, stem: str) -> list[str]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf`` at its exact size, without timestamps; returns both paths."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    paths = [f"{stem}.png", f"{stem}.pdf"]
    atomic_write(paths[0], lambda tmp: fig.savefig(tmp, format="png", metadata=PNG_METADATA))
    atomic_write(paths[1], lambda tmp: fig.savefig(tmp, format="pdf", metadata=PDF_METADATA))
    return paths


def tight_bbox(fig, pad: float = 0.1):
    """The figure's tight bounding box in inches plus ``pad``, computed once and reused for every format."""
    return fig.get_tightbbox(fig.canvas.get_renderer()).padded(pad)


def close(fig) -> None:
    """Release a figure's memory."""
    plt.close(fig)
