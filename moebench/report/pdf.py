"""``report.pdf``: text pages (settings, tables) and one page per figure, through matplotlib's PdfPages.

Fonts are TrueType (Type 42) throughout, text pages use DejaVu Sans Mono, and the file carries no
creation date, so the same tables give the same bytes.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages

from moebench.report import style

PAGE = (11.0, 8.5)  # inches, landscape
MARGIN = 0.5
MAX_FONT = 8.0
LINE_HEIGHT = 1.35


def _text_page(pdf: PdfPages, title: str, lines: list[str]) -> None:
    width = max([len(line) for line in lines] + [40])
    size = min(MAX_FONT, (PAGE[0] - 2 * MARGIN) * 72 / (0.61 * width))
    fig = plt.figure(figsize=PAGE)
    fig.text(MARGIN / PAGE[0], 1 - MARGIN / PAGE[1], title, fontsize=11, fontweight="bold", va="top")
    step = size * LINE_HEIGHT / 72 / PAGE[1]
    top = 1 - (MARGIN + 0.35) / PAGE[1]
    for i, line in enumerate(lines):
        fig.text(MARGIN / PAGE[0], top - i * step, line.replace("$", r"\$"), fontsize=size,
                 family="DejaVu Sans Mono", va="top")
    pdf.savefig(fig)
    plt.close(fig)


def text_pages(pdf: PdfPages, title: str, lines: list[str]) -> None:
    """``lines`` on as many pages as they need, titled ``title`` (continued pages marked)."""
    width = max([len(line) for line in lines] + [40])
    size = min(MAX_FONT, (PAGE[0] - 2 * MARGIN) * 72 / (0.61 * width))
    per_page = max(10, int((PAGE[1] - 2 * MARGIN - 0.35) * 72 / (size * LINE_HEIGHT)))
    chunks = [lines[i:i + per_page] for i in range(0, len(lines), per_page)] or [[]]
    for k, chunk in enumerate(chunks):
        _text_page(pdf, title + (f" (continued, {k + 1}/{len(chunks)})" if k else ""), chunk)


def figure_page(pdf: PdfPages, fig, heading: str) -> None:
    """A figure on its own page, with ``heading`` above it."""
    fig.text(0.5, 1.0, heading, ha="center", va="bottom", fontsize=9, fontweight="bold")
    pdf.savefig(fig, bbox_inches=style.tight_bbox(fig))


def write_pdf(path: str, sections: list[tuple[str, list[str]]], figures: list[tuple[str, object]]) -> str:
    """Write ``sections`` (title, text lines) then ``figures`` (heading, open figure) to ``path``."""
    with style.figure_style(), PdfPages(path, metadata=dict(style.PDF_METADATA)) as pdf:
        for title, lines in sections:
            text_pages(pdf, title, lines)
        for heading, fig in figures:
            figure_page(pdf, fig, heading)
    return path
