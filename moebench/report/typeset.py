"""Typesetting for the PDF: text measured in points, words wrapped, tables laid out in columns.

Text is measured with matplotlib's own font machinery (DejaVu Sans, the font the PDF embeds), so
column widths and line breaks are exact and the same on every machine. A table is laid out once:
each column as wide as its widest cell (headers wrap at spaces and underscores), numeric columns
right-aligned, and, where the table is wider than the page, the font steps down to `MIN_SIZE` and
the widest text column wraps. `chunks` splits the rows into pieces of at most `MAX_ROWS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.font_manager import FontProperties

FONT = "DejaVu Sans"
SIZE, MIN_SIZE = 9.0, 7.0
GAP = 10.0  # points between columns
LEADING = 1.45  # line height / font size
MAX_ROWS = 25  # body rows per table piece (a page holds at most this many rows of one table)
_RENDERER = RendererAgg(10, 10, 72)  # 72 dpi: pixels are points


@lru_cache(maxsize=20000)
def width(text: str, size: float = SIZE, bold: bool = False) -> float:
    """Width of ``text`` in points."""
    if not text:
        return 0.0
    prop = FontProperties(family=FONT, size=size, weight="bold" if bold else "normal")
    return _RENDERER.get_text_width_height_descent(text, prop, ismath=False)[0]


def _tokens(text: str) -> list[str]:
    """Words with their trailing space, long words cut after underscores / slashes (kept on the piece)."""
    return [p for word in re.findall(r"\S+\s*", text) for p in re.findall(r"[^_/]*[_/]|[^_/]+\s*$|[^_/]+", word)
            if p] or [text]


def wrap(text: str, limit: float, size: float = SIZE, bold: bool = False) -> list[str]:
    """``text`` broken into lines no wider than ``limit`` points where breaks exist (greedy)."""
    lines, line = [], ""
    for token in _tokens(str(text)):
        if line and width((line + token).rstrip(), size, bold) > limit:
            lines.append(line.rstrip())
            line = token
        else:
            line += token
    return [*lines, line.rstrip()] if line or not lines else lines


def line_height(size: float = SIZE) -> float:
    """Points from one baseline to the next."""
    return size * LEADING


@dataclass
class TableLayout:
    """Columns of a table: widths (points), right alignment, font size, wrapped header and cells."""

    size: float
    widths: list[float]
    right: list[bool]
    header: list[list[str]]
    cells: list[list[list[str]]] = field(default_factory=list)  # row -> column -> lines

    @property
    def total(self) -> float:
        """Width of the table in points."""
        return sum(self.widths) + GAP * (len(self.widths) - 1)

    def row_height(self, row: int) -> float:
        """Height of body row ``row`` in points."""
        return max(len(c) for c in self.cells[row]) * line_height(self.size)

    def header_height(self) -> float:
        """Height of the header in points."""
        return max(len(h) for h in self.header) * line_height(self.size)


def _columns(header, rows, size: float, numeric_from: int | None, wrap_col: int | None, limit: float):
    n = len(header)
    right = [numeric_from is not None and i >= numeric_from for i in range(n)]
    body = [max([width(str(r[i]), size) for r in rows] + [0.0]) for i in range(n)]
    words = [max(width(t.strip(), size, True) for t in _tokens(h)) for h in header]
    widths = [max(b, w) for b, w in zip(body, words, strict=True)]
    if wrap_col is not None:
        spare = limit - (sum(widths) - widths[wrap_col] + GAP * (n - 1))
        widths[wrap_col] = max(words[wrap_col], min(widths[wrap_col], spare))
    heads = [wrap(h, w, size, True) for h, w in zip(header, widths, strict=True)]
    cells = [[wrap(str(c), widths[i], size) if i == wrap_col else [str(c)] for i, c in enumerate(r)] for r in rows]
    return TableLayout(size, widths, right, heads, cells)


def layout_table(header: list[str], rows: list[list[str]], limit: float, numeric_from: int | None = None,
                 wrap_col: int | None = None) -> TableLayout:
    """Fit a table into ``limit`` points: full size if it fits, else smaller type, then wrapping the widest
    text column (or ``wrap_col``, at full size, when given)."""
    if wrap_col is not None:
        return _columns(header, rows, SIZE, numeric_from, wrap_col, limit)
    for size in (SIZE, 8.5, 8.0, 7.5, MIN_SIZE):
        lay = _columns(header, rows, size, numeric_from, None, limit)
        if lay.total <= limit:
            return lay
    text_cols = [i for i in range(len(header)) if not lay.right[i]]
    widest = max(text_cols or range(len(header)), key=lambda i: lay.widths[i])
    return _columns(header, rows, MIN_SIZE, numeric_from, widest, limit)


def chunks(n_rows: int, per: int = MAX_ROWS) -> list[range]:
    """Row ranges of at most ``per`` rows, balanced (60 rows -> 20, 20, 20 rather than 25, 25, 10)."""
    if n_rows <= per:
        return [range(n_rows)]
    pieces = -(-n_rows // per)
    size = -(-n_rows // pieces)
    return [range(i, min(n_rows, i + size)) for i in range(0, n_rows, size)]
