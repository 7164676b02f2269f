"""``report.pdf``: a title page with the study's settings and contents, typeset tables, then the
figures.

Pages are US Letter landscape. Tables are set in DejaVu Sans (proportional) with booktabs-style
rules (a heavy rule above the header, a light one below it and a heavy one at the end), numbers
right-aligned, a hairline where the group column changes, at most `typeset.MAX_ROWS` rows a page; a
longer table continues on the next page under its repeated header. Small tables share a page. Each
figure gets a page of its own, drawn as vector graphics at its paper size under its heading, its
caption below; figure pages are as wide as the others and as tall as their content. Every page has a
footer with the page number. Fonts are TrueType (Type 42), text never goes through mathtext, and the
file carries no creation date: same tables, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.transforms import Bbox

from moebench.report import style, typeset
from moebench.report.typeset import line_height, width, wrap
from moebench.util import atomic_write

PAGE = (11.0, 8.5)  # inches, landscape
MARGIN = 0.6
TEXT_W = (PAGE[0] - 2 * MARGIN) * 72  # points
HEADING, BODY, FOOT = 12.0, 9.0, 7.5
GREY = "#777777"


@dataclass
class Table:
    """A table block: title, header, rows of strings, first numeric column, group column, note below."""

    title: str
    header: list[str]
    rows: list[list[str]]
    numeric_from: int | None = None
    group: int | None = None
    note: str = ""


@dataclass
class Text:
    """A block of paragraphs under a title."""

    title: str
    paragraphs: list[str] = field(default_factory=list)


class Page:
    """One page being filled: drawing operations in points from the top-left corner of the text area."""

    def __init__(self):
        self.ops: list[tuple] = []
        self.y = 0.0

    def room(self) -> float:
        """Points left above the footer."""
        return (PAGE[1] - 2 * MARGIN) * 72 - 24 - self.y

    def text(self, x: float, s: str, size: float = BODY, bold: bool = False, right: bool = False,
             colour: str = "black") -> None:
        """A line of text with its top at the current y."""
        self.ops.append(("text", x, self.y, s, size, bold, right, colour))

    def rule(self, weight: float, x0: float = 0.0, x1: float = TEXT_W, colour: str = "black") -> None:
        """A horizontal rule at the current y."""
        self.ops.append(("rule", x0, x1, self.y, weight, colour))


def _heading(page: Page, title: str) -> None:
    page.y += 6 if page.y else 0
    page.text(0, title, HEADING, bold=True)
    page.y += HEADING * 1.7


def _paragraphs(page: Page, lines: list[str], size: float = BODY) -> None:
    for line in lines:
        page.text(0, line, size)
        page.y += line_height(size)


def _table_piece(page: Page, lay: typeset.TableLayout, rows: range, table: Table) -> None:
    xs, x = [], 0.0
    for w in lay.widths:
        xs.append(x)
        x += w + typeset.GAP
    lh = line_height(lay.size)
    page.rule(0.8, 0, lay.total)
    page.y += 3
    for k in range(max(len(h) for h in lay.header)):
        for i, lines in enumerate(lay.header):
            if k < len(lines):
                page.text(xs[i] + (lay.widths[i] if lay.right[i] else 0), lines[k], lay.size, True, lay.right[i])
        page.y += lh
    page.rule(0.5, 0, lay.total)
    page.y += 3
    previous = None
    for r in rows:
        key = table.rows[r][table.group] if table.group is not None else None
        if previous is not None and key != previous:
            page.rule(0.3, 0, lay.total, "#BBBBBB")
        previous = key
        for i, lines in enumerate(lay.cells[r]):
            for k, line in enumerate(lines):
                page.ops.append(("text", xs[i] + (lay.widths[i] if lay.right[i] else 0), page.y + k * lh, line,
                                 lay.size, False, lay.right[i], "black"))
        page.y += lay.row_height(r)
    page.y += 2
    page.rule(0.8, 0, lay.total)
    page.y += 8


def flow(blocks: list) -> tuple[list[Page], dict[str, int]]:
    """Lay ``blocks`` (`Table`, `Text`) onto pages; returns the pages and block title -> first page index."""
    pages, starts = [Page()], {}
    for block in blocks:
        if isinstance(block, Text):
            lines = [part for p in block.paragraphs for part in (wrap(p, TEXT_W, BODY) if p else [""])]
            need = HEADING * 1.7 + min(len(lines), 4) * line_height(BODY)
            if pages[-1].room() < need:
                pages.append(Page())
            starts.setdefault(block.title, len(pages) - 1)
            _heading(pages[-1], block.title)
            for line in lines:
                if pages[-1].room() < line_height(BODY):
                    pages.append(Page())
                _paragraphs(pages[-1], [line])
            pages[-1].y += 6
            continue
        lay = typeset.layout_table(block.header, block.rows, TEXT_W, block.numeric_from)
        pieces = typeset.chunks(len(block.rows))
        for k, rows in enumerate(pieces):
            body = sum(lay.row_height(r) for r in rows)
            note = wrap(block.note, TEXT_W, BODY) if block.note and k == len(pieces) - 1 else []
            need = HEADING * 1.7 + lay.header_height() + body + 20 + len(note) * line_height(BODY)
            if pages[-1].y and pages[-1].room() < need:
                pages.append(Page())
            starts.setdefault(block.title, len(pages) - 1)
            _heading(pages[-1], block.title + (f" (continued, {k + 1} of {len(pieces)})" if k else ""))
            _table_piece(pages[-1], lay, rows, block)
            _paragraphs(pages[-1], note)
    return [p for p in pages if p.ops], starts


def _new_page(size=PAGE):
    return plt.figure(figsize=size)


def _draw(fig, page: Page, size=PAGE, origin=(0.0, 0.0)) -> None:
    """Draw a page's operations on ``fig`` (whose page area starts ``origin`` inches from its corner)."""
    w, h = fig.get_size_inches()
    left, top = (MARGIN - origin[0]) * 72, (size[1] - MARGIN - origin[1]) * 72

    def at(x_pt: float, y_pt: float) -> tuple[float, float]:
        return (left + x_pt) / (w * 72), (top - y_pt) / (h * 72)

    for op in page.ops:
        if op[0] == "text":
            _, x, y, s, size_pt, bold, right, colour = op
            baseline = y + 0.5 * line_height(size_pt) + 0.35 * size_pt  # centred in its line
            fig.text(*at(x, baseline), s, fontsize=size_pt, fontweight="bold" if bold else "normal", va="baseline",
                     ha="right" if right else "left", color=colour, parse_math=False, family=typeset.FONT)
        else:
            _, x0, x1, y, weight, colour = op
            (a, b), (c, _) = at(x0, y), at(x1, y)
            fig.add_artist(plt.Line2D([a, c], [b, b], linewidth=weight, color=colour))


def _footer(label: str, number: int, total: int, page_h: float = PAGE[1]) -> Page:
    page = Page()
    page.y = (page_h - 2 * MARGIN) * 72 - FOOT
    page.text(0, label, FOOT, colour=GREY)
    page.text(TEXT_W, f"page {number} of {total}", FOOT, right=True, colour=GREY)
    return page


def title_page(title: str, subtitle: str, settings: list[tuple[str, str]], contents: list[tuple[str, int]]) -> Page:
    """The first page: title, subtitle, the study's settings as a two-column table, then the contents."""
    page = Page()
    page.text(0, title, 18, bold=True)
    page.y += 30
    if subtitle:
        _paragraphs(page, wrap(subtitle, TEXT_W, 10), 10)
        page.y += 6
    rows = [list(kv) for kv in settings]
    lay = typeset.layout_table(["setting", "value"], rows, TEXT_W, wrap_col=1)
    _table_piece(page, lay, range(len(rows)), Table("", ["setting", "value"], rows))
    page.text(0, "Contents", HEADING, bold=True)
    page.y += HEADING * 1.6
    half = -(-len(contents) // 2)
    top = page.y
    for k, (name, number) in enumerate(contents):
        x = 0.0 if k < half else TEXT_W / 2
        page.y = top + (k % half) * line_height(BODY)
        label = name if width(name, BODY) < TEXT_W / 2 - 40 else wrap(name, TEXT_W / 2 - 50, BODY)[0] + " ..."
        page.text(x, label, BODY)
        page.text(x + TEXT_W / 2 - 20, str(number), BODY, right=True)
    page.y = top + half * line_height(BODY)
    return page


def figure_page(pdf: PdfPages, fig, heading: str, caption: str, label: str, number: int, total: int) -> None:
    """``fig`` at its own size on a page of its own: heading above, caption below, the footer.

    The page is the figure's canvas widened to the page width (`savefig` with a box larger than the
    figure), so the figure stays vector graphics at its paper size; the page is as tall as heading,
    figure, caption and footer need, so a small figure does not sit alone on a blank page.
    """
    w, h = fig.get_size_inches()
    text_w = min(TEXT_W, max(w, style.TWO_COLUMN) * 72)
    lines = wrap(caption, text_w, BODY)
    above, below = 0.45, 0.2 + len(lines) * line_height(BODY) / 72
    page_h = h + above + below + 2 * MARGIN + 0.35  # as tall as its content: no page mostly blank
    size = (PAGE[0], page_h)
    ox, oy = (PAGE[0] - w) / 2, page_h - MARGIN - above - h  # the figure's corner on the page, inches
    x = ((PAGE[0] * 72 - text_w) / 2) - MARGIN * 72
    page = Page()
    page.text(x, heading, HEADING - 1, bold=True)
    page.y = (above + h + 0.2) * 72
    for line in lines:
        page.text(x, line)
        page.y += line_height(BODY)
    _draw(fig, page, size, (ox, oy))
    _draw(fig, _footer(label, number, total, page_h), size, (ox, oy))
    pdf.savefig(fig, bbox_inches=Bbox([[-ox, -oy], [PAGE[0] - ox, page_h - oy]]))


def write_pdf(path: str, title: tuple[str, str, list], blocks: list, figures: list[tuple[str, str, object]],
              label: str) -> str:
    """Write the report: ``title`` (title, subtitle, settings pairs), ``blocks`` (`Table` / `Text`), then
    ``figures`` (heading, caption, open figure), every page footed with ``label`` and its number."""
    pages, starts = flow(blocks)
    total = 1 + len(pages) + len(figures)
    contents = [(name, 2 + k) for name, k in starts.items()]
    contents += [(heading, 2 + len(pages) + i) for i, (heading, _, _) in enumerate(figures)]
    atomic_write(path, lambda tmp: _write_pages(tmp, title, pages, contents, figures, label, total))
    return path


def _write_pages(path, title, pages, contents, figures, label, total) -> None:
    with style.figure_style(), PdfPages(path, metadata=dict(style.PDF_METADATA)) as pdf:
        text_pages = [title_page(*title, contents), *pages]
        for number, page in enumerate(text_pages, 1):
            size = PAGE
            if number == len(text_pages) and page.y < 0.4 * (PAGE[1] - 2 * MARGIN) * 72:  # a short last page
                size = (PAGE[0], page.y / 72 + 2 * MARGIN + 0.45)
            fig = _new_page(size)
            _draw(fig, page, size)
            _draw(fig, _footer(label, number, total, size[1]), size)
            pdf.savefig(fig)
            plt.close(fig)
        for i, (heading, caption, fig) in enumerate(figures):
            figure_page(pdf, fig, heading, caption, label, 2 + len(pages) + i, total)
