"""One place for how figures look and how they are written: palette, fonts, byte-stable saving.

Colours are the Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design"), distinguishable
under the common colour-vision deficiencies; markers and line styles repeat the distinction so
figures also read in greyscale.

A method keeps one look through a whole report (`MethodStyles`, built once per report by
`report_styles`): the same colour and marker in every panel and every figure, its calibration
source shown by the line style. Methods take, in alphabetical order, the first pair of colour
(`PANEL_COLOURS`: Okabe-Ito without black, kept for the unpruned reference, and yellow, too faint on
white) and marker (`MARKERS`) that no other method has and whose colour and marker no method
already drawn beside it (same model and kind of method, or same calibration-effect figure) has:
six colours times eight markers give 48 distinct looks, and up to six methods a panel differ in
both colour and marker. The unpruned model is always black with a star (`BASELINE`); random
pruning is the grey band. Ratios (latency lines) take shades of the sequential ``cividis`` map, so
they never look like a method. Figures are drawn at the widths of a paper's column (`ONE_COLUMN`, 3.3 in) or page
(`TWO_COLUMN`, 6.9 in) with 8-9 pt text, and saved at exactly that size. Fonts are embedded as
TrueType (Type 42), never Type 3, which conference submission systems reject. Files carry no
creation dates or software stamps, so rendering the same tables twice gives identical bytes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from moebench.report import facets
from moebench.util import atomic_write

# Okabe-Ito, black first (kept for the unpruned reference), then in their published order.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}
# Colours of the series of one panel, in order (at most six series a panel: no colour twice).
PANEL_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
REFERENCE_COLOUR = OKABE_ITO["black"]
BAND_COLOUR = "#B0B0B0"  # the random-seed band and other context drawn behind the series
ONE_COLUMN, TWO_COLUMN = 3.3, 6.9  # inches: a paper's column and its full text width
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<"]  # the star is the unpruned model's
HATCHES = ["", "////", "\\\\\\\\", "....", "xxxx", "oo", "----", "++++"]  # bars: a hatch per marker, for greyscale
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


@dataclass(frozen=True)
class Look:
    """One method's colour, marker and bar hatch."""

    color: str
    marker: str
    hatch: str = ""

    def line(self, variant: int = 0) -> dict:
        """Line/marker keywords: the look, with line style ``variant`` (a panel's calibration source)."""
        return {"color": self.color, "marker": self.marker, "linestyle": LINESTYLES[variant % len(LINESTYLES)],
                "markersize": 4, "linewidth": 1.3}

    def bar(self) -> dict:
        """Bar keywords: the colour, hatched (white) with the pattern that goes with the marker."""
        return {"color": self.color, "hatch": self.hatch, "edgecolor": "white", "linewidth": 0}


BASELINE_LABEL = "unpruned"
BASELINE = Look(REFERENCE_COLOUR, "*")
# (colour index, marker index), 48 distinct pairs: the first six differ in both, then each colour
# comes back with the markers it has not had yet.
_LOOKS = [(k % len(PANEL_COLOURS), (k + k // len(PANEL_COLOURS)) % len(MARKERS))
          for k in range(len(PANEL_COLOURS) * len(MARKERS))]


class MethodStyles:
    """method label -> `Look`, fixed for a report (see the module docstring for the rule).

    ``groups`` are sets of methods drawn side by side (a panel, a figure); within a group of at most
    six, no colour and no marker occurs twice. Beyond 48 methods, looks repeat in the same order.
    """

    def __init__(self, methods, groups=()):
        self.methods = sorted(set(methods) - {BASELINE_LABEL})
        groups = [set(g) for g in groups]
        taken: dict[str, tuple[int, int]] = {}
        for method in self.methods:
            near = [taken[m] for g in groups if method in g for m in g if m in taken and m != method]
            colours, markers = {c for c, _ in near}, {m for _, m in near}
            free = [p for p in _LOOKS if p not in taken.values()]
            if not free:  # more than 48 methods: looks repeat
                taken[method] = _LOOKS[len(taken) % len(_LOOKS)]
                continue
            taken[method] = ([p for p in free if p[0] not in colours and p[1] not in markers]
                             or [p for p in free if p[0] not in colours] or [p for p in free if p[1] not in markers]
                             or free)[0]
        self._looks = {m: Look(PANEL_COLOURS[c], MARKERS[k], HATCHES[k]) for m, (c, k) in taken.items()}

    def __getitem__(self, method: str) -> Look:
        if method == BASELINE_LABEL:
            return BASELINE
        if method not in self._looks:
            raise KeyError(f"method {method!r} is not in this report's style table (built from its methods)")
        return self._looks[method]

    def __contains__(self, method: str) -> bool:
        return method == BASELINE_LABEL or method in self._looks

    def items(self) -> list[tuple[str, Look]]:
        """(method, look) in alphabetical order of the methods."""
        return [(m, self._looks[m]) for m in self.methods]


def report_styles(table, effect=None) -> MethodStyles:
    """The `MethodStyles` of a report whose main table (`tables.summary`) is ``table``: every method drawn
    as a series (not the unpruned model, not random's band), grouped as the faceted figures draw them
    (per model and kind of method) and, with ``effect`` (`domains.calibration_effect`), its methods."""
    drawn = table[~table["baseline"] & (table["facet"] != facets.BAND)]
    groups: dict[tuple, set] = {}
    for panel in facets.panels(drawn):
        groups.setdefault((panel.model, panel.facet), set()).update(m for m, _ in panel.series)
    methods = set(drawn["method"])
    extra = [set(effect["method"])] if effect is not None and len(effect) else []
    return MethodStyles(methods | {m for g in extra for m in g}, [*groups.values(), *extra])


def ratio_looks(ratios) -> dict[float, Look]:
    """ratio -> `Look` for lines that stand for ratios: shades of ``cividis`` (dark for the smallest
    ratio, light for the largest), a marker each."""
    ratios = sorted(ratios)
    cmap = matplotlib.colormaps[SEQUENTIAL_CMAP]
    spread = [0.1 + 0.7 * i / max(len(ratios) - 1, 1) for i in range(len(ratios))]
    return {r: Look(matplotlib.colors.to_hex(cmap(t)), MARKERS[i % len(MARKERS)]) for i, (r, t) in
            enumerate(zip(ratios, spread, strict=True))}


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
