"""How a report's figures look together: one colour and marker per method in every panel and figure,
nothing cut off at the figure's edge (legends, colour-bar labels), accuracy with its 95% interval."""

from __future__ import annotations

import math

import matplotlib.colors as mcolors
import pytest
from matplotlib.collections import LineCollection
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.transforms import Bbox
from PIL import Image
from report_data import recovered_study
from test_figures import rich_study
from test_report import make_results

from moebench.report import build, facets, style
from moebench.report import figures as F
from moebench.report.domains import calibration_effect
from moebench.report.tables import MetricSpec, load_studies, summary
from moebench.report.uncertainty import Z95


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    study = load_studies(rich_study(str(tmp_path_factory.mktemp("looks"))))[0]
    return summary(study, MetricSpec())


def _drawn(folder: str) -> list:
    """The report's figures and skip notes, drawn as `moebench report` draws them."""
    study = load_studies(folder)[0]
    table = summary(study, MetricSpec())
    effect = calibration_effect(study, table, MetricSpec())
    with style.figure_style():
        return build.draw_figures(study, table, effect, MetricSpec())


def _method(label: str) -> str:
    return label.split(" [")[0]


def _looks(fig) -> dict[str, set]:
    """method -> the (colour, marker or hatch) of every legend entry that stands for it, over all panels."""
    out: dict[str, set] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label in ("other cells", "Pareto front (all cells)") or label.startswith(("random", "unpruned")):
                continue
            if isinstance(handle, ErrorbarContainer):
                handle = handle[0]
            if isinstance(handle, BarContainer):
                patch = handle.patches[0]
                look = (mcolors.to_hex(patch.get_facecolor()), "hatch:" + (patch.get_hatch() or ""))
            else:
                look = (mcolors.to_hex(handle.get_color()), handle.get_marker())
            out.setdefault(_method(label), set()).add(look)
    return out


def test_a_method_has_one_colour_and_marker_in_every_panel_and_figure(rich, tmp_path):
    styles = style.report_styles(rich)
    seen: dict[str, set] = {}
    with style.figure_style():
        figures = [F.accuracy_vs_ratio(rich, "acc", styles), F.recovery_vs_ratio(rich, styles),
                   F.memory_pareto(rich, styles), F.speedup_vs_ratio(rich, 5, styles)]
        for figure in figures:
            for method, looks in _looks(figure.fig).items():
                seen.setdefault(method, set()).update(looks)
            style.close(figure.fig)
    assert len(seen) == 11  # every series method of the rich study, in all four figures
    for method, looks in seen.items():
        assert looks == {(styles[method].color.lower(), styles[method].marker)}, (method, looks)
    # naee is drawn in two panels (search, and beside its skipping composite): the same look in both
    assert len({frozenset(v) for v in seen.values()}) == len(seen)  # no two methods look alike
    # building the styles again (or inside a figure, without them) gives the same table
    again = style.report_styles(rich.sample(frac=1.0, random_state=3))
    assert [(m, look) for m, look in again.items()] == list(styles.items())
    with style.figure_style():
        plain = F.accuracy_vs_ratio(rich, "acc")
        assert _looks(plain.fig) == {
            m: {(styles[m].color.lower(), styles[m].marker)} for m in _looks(plain.fig)}
        style.close(plain.fig)


def test_a_method_keeps_its_colour_between_line_and_bar_figures(tmp_path):
    drawn = _drawn(make_results(str(tmp_path)))
    figures = {f.name: f for f in drawn if isinstance(f, F.Figure)}
    lines, bars = _looks(figures["accuracy_vs_ratio"].fig), _looks(figures["calibration_effect"].fig)
    assert set(bars) == {"grape", "reap"} <= set(lines)
    for method in bars:
        ((colour, marker),) = lines[method]
        ((bar_colour, hatch),) = bars[method]
        assert bar_colour == colour  # the bars take the method's colour ...
        assert hatch == "hatch:" + style.HATCHES[style.MARKERS.index(marker)]  # ... and the hatch of its marker
    assert len({h for v in bars.values() for _, h in v}) == 2  # greyscale: the two methods' bars differ
    for item in figures.values():
        style.close(item.fig)


def test_method_styles_separate_methods_drawn_together_and_fix_the_unpruned_look():
    names = [f"m{i:02d}" for i in range(30)]
    groups = [names[i:i + 6] for i in range(0, 30, 6)] + [names[3::5]]
    styles = style.MethodStyles(names, groups)
    pairs = [(look.color, look.marker) for _, look in styles.items()]
    assert len(set(pairs)) == 30  # more methods than colours: colour and marker together stay unique
    for group in groups:
        looks = [styles[m] for m in group]
        assert len({x.color for x in looks}) == len(group) and len({x.marker for x in looks}) == len(group), group
    assert styles["unpruned"] == style.BASELINE and style.BASELINE.marker == "*"
    assert "*" not in style.MARKERS and style.REFERENCE_COLOUR not in style.PANEL_COLOURS
    assert style.MethodStyles(list(reversed(names)), groups).items() == styles.items()  # order of input is moot
    many = style.MethodStyles([f"x{i:02d}" for i in range(48)])
    assert len({(x.color, x.marker) for _, x in many.items()}) == 48
    with pytest.raises(KeyError, match="not in this report"):
        styles["absent"]


def _inside(box: Bbox, frame: Bbox, what: str) -> None:
    tol = 0.5  # pixels
    assert (box.x0 >= frame.x0 - tol and box.y0 >= frame.y0 - tol and box.x1 <= frame.x1 + tol
            and box.y1 <= frame.y1 + tol), f"{what} {box.bounds} is cut off by the figure {frame.bounds}"


def _checked_artists(fig):
    """(name, artist) of every legend, colour-bar label, title and axis label of ``fig``."""
    out = [(f"figure legend {i}", leg) for i, leg in enumerate(fig.legends)]
    for k, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        if ax.get_legend() is not None:
            out.append((f"legend of axes {k}", ax.get_legend()))
        label = "colour-bar label" if ax.get_label() == "<colorbar>" else "axis label"
        out += [(f"{label} {t.get_text()!r}", t) for t in (ax.xaxis.label, ax.yaxis.label) if t.get_text()]
        out += [(f"title {ax.title.get_text()!r}", ax.title)] if ax.title.get_text() else []
    return out


STUDIES = {"two-row study": lambda root: make_results(root, small=True), "full study": make_results,
           "every kind of method": rich_study,  # seven panels, labels long enough to wrap
           "recovered cells": lambda root: recovered_study(root, rich=True)}  # before/after recovery, two ratios


@pytest.mark.parametrize("kind", list(STUDIES))
def test_no_legend_or_colour_bar_label_is_cut_off(tmp_path, kind):
    drawn = _drawn(STUDIES[kind](str(tmp_path / "results")))
    figures = [f for f in drawn if isinstance(f, F.Figure)]
    assert {"memory_pareto", "recovery_heatmap", "accuracy_vs_ratio"} <= {f.name for f in figures}
    assert ("recovery_after_finetune" in {f.name for f in figures}) == (kind == "recovered cells")
    bars = 0
    with style.figure_style():
        for item in figures:
            png = style.save_figure(item.fig, str(tmp_path / item.name))[0]
            item.fig.canvas.draw()
            renderer = item.fig.canvas.get_renderer()
            width, height = Image.open(png).size  # the saved figure: its size, at the saving resolution
            scale = item.fig.dpi / style.RC["savefig.dpi"]
            saved = Bbox.from_bounds(0, 0, width * scale, height * scale)
            assert saved.width == pytest.approx(item.fig.bbox.width, abs=1)
            assert saved.height == pytest.approx(item.fig.bbox.height, abs=1)
            checked = _checked_artists(item.fig)
            assert any(name.startswith(("legend", "colour-bar")) for name, _ in checked), item.name
            for name, artist in checked:
                bars += name.startswith("colour-bar")
                _inside(artist.get_window_extent(renderer), saved, f"{item.name}: {name}")
            tight = item.fig.get_tightbbox(renderer)  # everything drawn, in inches
            _inside(Bbox.from_extents(*(v * item.fig.dpi for v in tight.extents)), saved, f"{item.name}: drawing")
            style.close(item.fig)
    assert bars >= 1  # the heat map's colour bar was among the checked labels


def _bars_of(ax) -> list[LineCollection]:
    return [c for c in ax.collections if isinstance(c, LineCollection)]


def test_accuracy_carries_its_95_percent_interval_where_scores_have_stderrs(rich):
    with style.figure_style():
        figure = F.accuracy_vs_ratio(rich, "acc")
        assert "Bars: 95% interval" in figure.caption
        panels = [ax for ax in figure.fig.axes if ax.axison]
        search = next(ax for ax in panels if ax.get_title().startswith("search"))
        naee = rich[(rich["method"] == "naee") & ~rich["baseline"]].set_index("ratio")
        base = rich[rich["baseline"]].iloc[0]
        colour = mcolors.to_hex(style.report_styles(rich)["naee"].color)
        found = {}
        for coll in _bars_of(search):
            for (x0, y0), (x1, y1) in coll.get_segments():
                assert x0 == x1
                found[(round(x0, 6), mcolors.to_hex(coll.get_colors()[0]))] = ((y0 + y1) / 2, (y1 - y0) / 2)
        for ratio in (0.25, 0.5):
            middle, half = found[(ratio, colour)]
            assert middle == pytest.approx(100 * naee.at[ratio, "accuracy"])
            assert half == pytest.approx(Z95 * 100 * naee.at[ratio, "accuracy_stderr"])
        middle, half = found[(0.0, "#000000")]  # the unpruned model's own interval
        assert half == pytest.approx(Z95 * 100 * base["accuracy_stderr"]) and half > 0
        total = sum(len(c.get_segments()) for ax in panels for c in _bars_of(ax))
        cells = sum(len(rich[(rich["method"] == m) & (rich["calib"] == c) & ~rich["baseline"]])
                    for panel in facets.panels(rich) for m, c in panel.series)
        assert cells > 30 and total == cells + len(panels)  # every drawn cell, and the unpruned point in each panel
        style.close(figure.fig)
        # no stderr in the tables: no bars, and the caption says so
        bare = F.accuracy_vs_ratio(rich.assign(accuracy_stderr=math.nan), "acc")
        assert not any(_bars_of(ax) for ax in bare.fig.axes) and "No bars" in bare.caption
        style.close(bare.fig)
        # one cell without a stderr: the others keep theirs
        some = rich.copy()
        some.loc[(some["method"] == "naee") & (some["ratio"] == 0.5), "accuracy_stderr"] = math.nan
        partial = F.accuracy_vs_ratio(some, "acc")
        count = sum(len(c.get_segments()) for ax in partial.fig.axes for c in _bars_of(ax))
        assert count == total - 2  # naee is drawn twice: in its own panel and beside its skipping composite
        style.close(partial.fig)


def test_recovery_figure_draws_no_accuracy_bars(rich):
    with style.figure_style():
        figure = F.recovery_vs_ratio(rich)
        assert not any(_bars_of(ax) for ax in figure.fig.axes) and "95%" not in figure.caption
        style.close(figure.fig)
