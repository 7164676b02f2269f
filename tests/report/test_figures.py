"""Figures as a paper needs them: panels by kind of method, at most six series, each method in its own
colour and marker, the unpruned line and the random band in every panel, legends below the plots and smaller than them,
paper widths, 8-9 pt text, colour bars that say their unit, speed spread, and the PDF's pages."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.text import Text
from report_data import cell, write_study

from moebench.cli import main
from moebench.report import figures as F
from moebench.report import maps, style
from moebench.report.tables import MetricSpec, load_studies, summary

STATIC = ("frequency", "reap", "ean", "soft_activation", "premoe", "weight_norm")


def rich_study(root: str, spread: bool = True) -> str:
    """Every kind of method: five static scores with two calibrations each and a data-free one (11 series),
    NAEE, GRAPE, random over three seeds, NAEE with skipping, an input-aware method and a method this
    installation does not know."""
    cells = [cell("base", "none", 0.0, 0.9)]
    k = 0
    for ratio in (0.25, 0.5):
        for method in STATIC:
            for calib in ("testbed:mix", "testbed:arithmetic") if method != "weight_norm" else ("",):
                k += 1
                cells.append(cell(f"s{k:02d}", method, ratio, 0.85 - ratio / 2 - k / 400, calib=calib,
                                  speed=(100 + k, 97 + k, 103 + k)))
        cells += [cell(f"n{ratio}", "naee", ratio, 0.8 - ratio / 3), cell(f"g{ratio}", "grape", ratio, 0.7 - ratio / 4),
                  cell(f"k{ratio}", "naee", ratio, 0.79 - ratio / 3, skip="naee", speed=(80.0, 76.0, 83.0),
                       under_load=ratio == 0.5),
                  cell(f"t{ratio}", "premoe_taer", ratio, 0.88 - ratio / 8, calib="testbed:arithmetic",
                                  kind="select"),
                  cell(f"x{ratio}", "mystery", ratio, 0.6)]
        cells += [cell(f"r{ratio}{s}", "random", ratio, 0.7 - ratio / 2 - s / 50, params={"seed": s}) for s in range(3)]
    return write_study(root, cells, spread=spread)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    study = load_studies(rich_study(str(tmp_path_factory.mktemp("figs"))))[0]
    return summary(study, MetricSpec())


def _series_lines(ax):
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_") and ln.get_label() != "unpruned"]


def _check_panel_figure(fig, n_panels: int, legends_expected: bool = True):
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]
    assert len(panels) == n_panels
    width = fig.get_size_inches()[0]
    assert width in (style.ONE_COLUMN, style.TWO_COLUMN)
    legends = [ax.get_legend() for ax in fig.axes if not ax.axison and ax.get_legend() is not None]
    assert bool(legends) == legends_expected
    renderer = fig.canvas.get_renderer()
    plot_boxes = [ax.get_window_extent(renderer) for ax in panels]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert box.height < min(b.height for b in plot_boxes), "legend taller than a plot"
        assert box.width <= fig.bbox.width and box.x0 >= 0 and box.y0 >= 0, "legend outside the figure"
        assert not any(box.overlaps(b) for b in plot_boxes), "legend on a plot"
    sizes = {round(t.get_fontsize(), 1) for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()}
    assert sizes and min(sizes) >= 8 and max(sizes) <= 9, sizes
    return panels


def test_accuracy_figure_is_faceted_by_kind_with_band_and_reference(table):
    with style.figure_style():
        figure = F.accuracy_vs_ratio(table, "metric acc")
        panels = _check_panel_figure(figure.fig, 7)  # static x2 (12 series), search, global, input-aware, skip, other
        titles = [ax.get_title() for ax in panels]
        assert titles == ["static scores (1/2)", "static scores (2/2)", "search / enumeration / novices\ntestbed:mix",
                          "global budgets\ntestbed:mix", "input-aware\ntestbed:arithmetic",
                          "skipping composites\ntestbed:mix", "other methods\ntestbed:mix"]
        for ax in panels:
            lines = _series_lines(ax)
            assert 1 <= len(lines) <= 6, ax.get_title()
            looks = [(mcolors.to_hex(ln.get_color()), ln.get_marker(), ln.get_linestyle()) for ln in lines]
            assert len(set(looks)) == len(looks), (ax.get_title(), looks)  # no two series look alike in a panel
            methods = {ln.get_label().split(" [")[0]: look[:2] for ln, look in zip(lines, looks, strict=True)}
            colours = [c for c, _ in methods.values()]
            markers = [m for _, m in methods.values()]
            # a method's calibrations share its colour and marker (line style tells them apart); methods differ
            assert len(set(colours)) == len(colours) and len(set(markers)) == len(markers), (ax.get_title(), methods)
            reference = [ln for ln in ax.get_lines() if ln.get_label() == "unpruned"]
            assert reference and reference[0].get_linestyle() == "--"
            bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
            assert len(bands) == 1 and bands[0].get_label() == "random, 3 seeds (min-max)"
            ys = sorted({round(y, 6) for x, y in bands[0].get_paths()[0].vertices if abs(x - 0.25) < 1e-9})
            assert ys == [pytest.approx(100 * (0.575 - 2 / 50)), pytest.approx(100 * 0.575)]  # seeds 2 and 0
        skip_labels = [ln.get_label() for ln in _series_lines(panels[5])]
        assert skip_labels == ["naee", "naee+skip:naee"]  # the composite beside the same pruning without skipping
        style.close(figure.fig)


def test_speed_figure_shows_the_paired_interval_and_hollow_flagged_cells(tmp_path, table):
    with style.figure_style():
        figure = F.speedup_vs_ratio(table, reps=5)
        _check_panel_figure(figure.fig, 7)
        assert "timed interleaved with it" in figure.caption and "95% interval over 5 repetitions" in figure.caption
        assert "Hollow markers (1)" in figure.caption  # naee+skip at 50%, measured under load
        ax = figure.fig.axes[0]
        bars = [c for c in ax.collections if type(c).__name__ == "LineCollection"]
        assert bars and all(len(c.get_segments()) == 2 for c in bars)  # a bar per ratio per series
        hollow = [c for ax in figure.fig.axes for c in ax.collections if type(c).__name__ == "PathCollection"]
        assert len(hollow) == 1 and tuple(hollow[0].get_facecolor()[0]) == (1.0, 1.0, 1.0, 1.0)
        style.close(figure.fig)
        old = summary(load_studies(rich_study(str(tmp_path)))[0], MetricSpec()).assign(decode_speedup=float("nan"))
        skipped = F.speedup_vs_ratio(old)  # cells from before paired timing
        assert type(skipped).__name__ == "Skipped" and "before paired timing" in skipped.note


def test_heat_maps_have_colour_bars_with_units_and_maps_say_what_0_and_1_mean(tmp_path, table):
    with style.figure_style():
        heat = F.recovery_heatmap(table)
        bars = [ax for ax in heat.fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 1 and "%" in bars[0].get_xlabel()  # a horizontal bar below the panels
        style.close(heat.fig)
        plans = {"p1": {"kind": "prune", "keep": {"0": [0, 1, 2], "1": [0, 1]}, "extra": {"n_experts": 4}},
                 "p2": {"kind": "select", "keep": {"0": [0, 1], "1": [1, 2]},
                        "extra": {"keep_frequency": {"0": [1.0, 0.5, 0.5, 0.0], "1": [0.0, 1.0, 0.5, 0.5]}}}}
        rows = table[table["method_id"].isin(["grape", "premoe_taer"]) & (table["ratio"] == 0.25)]
        frame = rows.assign(cell=["p1" if m == "grape" else "p2" for m in rows["method_id"]])
        drawn = maps.kept_expert_maps(plans, frame)
        assert [d.name for d in drawn] == ["kept_experts_testbed-8e_grape", "kept_experts_testbed-8e_premoe-taer"]
        for item, ticks, words in ((drawn[0], ["0: removed", "1: kept"], "white (0): removed"),
                                   (drawn[1], ["0: never", "0.5", "1: always"], "0 = never kept")):
            (bar,) = [ax for ax in item.fig.axes if ax.get_label() == "<colorbar>"]
            assert [t.get_text() for t in bar.get_yticklabels()] == ticks and bar.get_ylabel()
            assert words in item.caption
            _check_panel_figure(item.fig, 1, legends_expected=False)
            style.close(item.fig)


def _ink_fraction(png: str) -> float:
    """Share of the page's pixel rows that hold anything darker than near-white."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"))
    return float((pixels < 235).any(axis=1).mean())


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm (poppler) is not installed")
def test_pdf_pages_render_typeset_and_none_is_mostly_blank(tmp_path):
    folder = rich_study(str(tmp_path / "results"))
    assert main(["report", folder, "--out", str(tmp_path / "reports")]) == 0
    pdf = tmp_path / "reports" / "unc" / "report.pdf"
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(glob.glob(str(tmp_path / "page-*.png")))
    figures = len(glob.glob(str(tmp_path / "reports" / "unc" / "figures" / "*.png")))
    # title page, main table (39 rows: 2 pages of at most 25), per-task (2 pages), then a page per figure
    assert figures >= 5 and len(pages) >= 1 + 2 + 2 + figures
    for page in pages:
        assert _ink_fraction(page) > 0.12, page
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True).stdout \
        if shutil.which("pdftotext") else ""
    if text:
        assert "Main table (continued, 2 of 2)" in text and text.count("recovery") >= 3  # header repeated
        assert "Contents" in text and re.search(r"Figure 1: Average accuracy vs pruning ratio\s+\d+", text)
    if shutil.which("pdffonts"):
        fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
        assert "Type 3" not in fonts and "DejaVuSans" in fonts and "Mono" not in fonts  # proportional type


def test_long_tables_split_into_balanced_pieces_with_repeated_headers():
    from moebench.report import pdf, typeset

    rows = [[f"m{i}", f"{i / 7:.2f}"] for i in range(60)]
    assert [len(r) for r in typeset.chunks(60)] == [20, 20, 20] and [len(r) for r in typeset.chunks(25)] == [25]
    pages, starts = pdf.flow([pdf.Table("Long", ["name", "value"], rows, numeric_from=1)])
    assert starts == {"Long": 0} and len(pages) == 3
    for page in pages:
        texts = [op[3] for op in page.ops if op[0] == "text"]
        assert texts.count("name") == 1 and texts.count("value") == 1  # the header on every page
        assert len([t for t in texts if t.startswith("m")]) <= typeset.MAX_ROWS
        rules = [op for op in page.ops if op[0] == "rule"]
        assert [r[4] for r in rules][:2] == [0.8, 0.5] and rules[-1][4] == 0.8  # top, header and bottom rules
    lay = typeset.layout_table(["a_long_header_name (acc)", "v"], [["x", "1.00"]], 500, numeric_from=1)
    assert lay.right == [False, True] and len(lay.header[0]) > 1  # wrapped at the underscores
    assert typeset.width("WWW") > typeset.width("iii")  # proportional type


def test_figures_write_at_paper_width(tmp_path, table):
    with style.figure_style():
        figure = F.recovery_vs_ratio(table)
        paths = style.save_figure(figure.fig, os.path.join(tmp_path, "rec"))
        from PIL import Image

        width_px = Image.open(paths[0]).size[0]
        assert width_px == round(style.TWO_COLUMN * style.RC["savefig.dpi"])
        style.close(figure.fig)
