"""The leaderboard as a reader uses it: rows grouped by ratio (a table per ratio in Markdown, a ratio
selector in the HTML), score columns sorted best first on the first click, and each row linked to its
cell's folder by a path that resolves from where the file is written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from report_data import cell, write_study

from moebench.report.leaderboard import write_leaderboard
from moebench.report.tables import MetricSpec

SCORES = ("avg acc ± stderr (%)", "recovery (%)", "decode speedup (x)")
NAMES = ("study", "model", "method", "calibration", "ratio", "cell (files)")


class Page(HTMLParser):
    """Tables (header cells with their attributes, rows with their cells) and the ratio selector's options."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.options, self._cell, self._where = [], [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"header": [], "rows": []})
        elif tag == "thead":
            self._where = "head"
        elif tag == "tbody":
            self._where = "body"
        elif tag == "tr" and self._where == "body":
            self.tables[-1]["rows"].append({"ratio": attrs.get("data-ratio"), "cells": []})
        elif tag in ("th", "td"):
            self._cell = {"text": "", **attrs}
        elif tag == "a" and self._cell is not None:
            self._cell["href"] = attrs["href"]
        elif tag == "option":
            self.options.append(attrs["value"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "th":
            self.tables[-1]["header"].append(self._cell)
            self._cell = None
        elif tag == "td":
            self.tables[-1]["rows"][-1]["cells"].append(self._cell)
            self._cell = None


@pytest.fixture
def board(tmp_path):
    """Two studies' results and their leaderboard, written two folders below the results' parent."""
    cells = [cell("base", "none", 0.0, 0.9)]
    for ratio in (0.25, 0.5):
        cells += [cell(f"f{ratio}", "frequency", ratio, 0.85 - ratio / 2),
                  cell(f"r{ratio}", "reap", ratio, 0.8 - ratio), cell(f"w{ratio}", "weight_norm", ratio, 0.6),
                  cell(f"n{ratio}", "naee", ratio, 0.82 - ratio / 3, speed=(90.0, 85.0, 95.0)),
                  cell(f"t{ratio}", "premoe_taer", ratio, 0.88, calib="testbed:domains", kind="select")]
    write_study(str(tmp_path / "results"), cells, study="alpha")
    write_study(str(tmp_path / "results"), [cell("b2", "none", 0.0, 0.7), cell("q2", "reap", 0.75, 0.5)], study="beta")
    out = tmp_path / "site" / "boards"
    paths = write_leaderboard(str(tmp_path / "results"), str(out), MetricSpec())
    assert [os.path.basename(p) for p in paths] == ["leaderboard.md", "leaderboard.html"]
    return {"root": tmp_path, "out": out, "md": (out / "leaderboard.md").read_text(),
            "page": Page((out / "leaderboard.html").read_text()), "html": (out / "leaderboard.html").read_text()}


def test_markdown_groups_each_section_by_ratio(board):
    md = board["md"]
    pruned, resident = md.split("## Input-aware and masked")
    assert re.findall(r"^### Ratio (\S+)$", pruned, re.M) == ["0.00", "0.25", "0.50", "0.75"]
    assert re.findall(r"^### Ratio (\S+)$", resident, re.M) == ["0.25", "0.50"]
    for part in (pruned, resident):
        for ratio, body in re.findall(r"^### Ratio (\S+)\n\n((?:.*\n)+?)(?:\n|$)", part + "\n", re.M):
            rows = [line for line in body.splitlines() if line.startswith(("| alpha", "| beta"))]
            assert rows and all(line.split(" | ")[4] == ratio for line in rows), (ratio, rows)
    group = pruned.split("### Ratio 0.25")[1].split("###")[0]
    methods = [line.split(" | ")[2] for line in group.splitlines() if line.startswith("| alpha")]
    assert methods == ["naee", "frequency", "weight_norm", "reap"]  # best recovery first within the group


def test_html_ratio_selector_and_rows_tagged_with_their_ratio(board):
    page = board["page"]
    assert page.options == ["", "0.00", "0.25", "0.50", "0.75"]  # "" shows every ratio
    assert len(page.tables) == 2 and 'onchange="showRatio(this.value)"' in board["html"]
    for table in page.tables:
        col = [h["text"] for h in table["header"]].index("ratio")
        assert table["rows"] and all(r["ratio"] == r["cells"][col]["text"] for r in table["rows"])
        ratios = [float(r["ratio"]) for r in table["rows"]]
        assert ratios == sorted(ratios)  # grouped: one ratio's rows together
    assert "<script src" not in board["html"] and "http" not in board["html"]  # no external files: works offline


def test_score_columns_sort_descending_on_the_first_click(board):
    header = {h["text"]: h["data-first"] for h in board["page"].tables[0]["header"]}
    assert {h: header[h] for h in SCORES} == dict.fromkeys(SCORES, "desc")
    assert {h: header[h] for h in NAMES} == dict.fromkeys(NAMES, "asc")
    assert header["resident weights (MB)"] == header["run peak (MB)"] == "asc"  # memory: smallest first


def _run_page_script(html: str, table: dict, clicks: list, ratio: str | None) -> list[list]:
    """Run the page's own script in node over a minimal stand-in for the DOM of ``table``: click the
    headers named in ``clicks`` in turn, then pick ``ratio``. Returns, after each click, the rows as
    (method, recovery) and, last, the methods of the rows left visible."""
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    data = {"header": [h["text"] for h in table["header"]],
            "rows": [{"ratio": r["ratio"], "cells": [{"text": c["text"], "v": c.get("data-v")} for c in r["cells"]]}
                     for r in table["rows"]],
            "first": [h["data-first"] for h in table["header"]], "clicks": clicks, "ratio": ratio}
    harness = script + """
const data = DATA;
const rows = data.rows.map((r) => ({dataset: {ratio: r.ratio}, hidden: false,
  cells: r.cells.map((c) => ({textContent: c.text, dataset: c.v === null ? {} : {v: c.v}}))}));
const body = {rows: rows.slice(),
  appendChild(row) { this.rows.splice(this.rows.indexOf(row), 1); this.rows.push(row); }};
const table = {tBodies: [body], tHead: {rows: [{cells: []}]}};
table.tHead.rows[0].cells = data.header.map((h, i) => ({cellIndex: i, dataset: {first: data.first[i]},
  closest: () => table}));
globalThis.document = {querySelectorAll: () => body.rows};
const method = data.header.indexOf("method"), recovery = data.header.indexOf("recovery (%)"), out = [];
for (const name of data.clicks) {
  sortBy(table.tHead.rows[0].cells[data.header.indexOf(name)]);
  out.push(body.rows.map((r) => [r.cells[method].textContent, parseFloat(r.cells[recovery].dataset.v)]));
}
if (data.ratio !== null) { showRatio(data.ratio); }
out.push(body.rows.filter((r) => !r.hidden).map((r) => r.cells[method].textContent));
console.log(JSON.stringify(out));
""".replace("DATA", json.dumps(data), 1)
    done = subprocess.run(["node", "-e", harness], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (runs the page's script)")
def test_page_script_sorts_best_first_and_filters_by_ratio(board):
    table = board["page"].tables[0]  # pruned
    by_rec, again, by_name, visible = _run_page_script(board["html"], table,
                                                       ["recovery (%)", "recovery (%)", "method"], "0.50")
    first = [v for _, v in by_rec]
    assert len(first) == 11 and first == sorted(first, reverse=True) and first[0] > first[-1]  # best first
    assert [v for _, v in again] == sorted(first)  # second click: reversed
    names = [m for m, _ in by_name]
    assert names == sorted(names) and names != [m for m, _ in by_rec]  # a name column: A-Z on its first click
    assert sorted(visible) == ["frequency", "naee", "reap", "weight_norm"]  # ratio 0.50 only
    assert _run_page_script(board["html"], table, [], "")[-1] == [r["cells"][2]["text"] for r in table["rows"]]


def test_every_row_links_to_its_cell_folder(board, tmp_path):
    out = board["out"]
    rows = [r for t in board["page"].tables for r in t["rows"]]
    assert len(rows) == 13  # 11 pruned (two studies), 2 input-aware
    for row in rows:
        (link,) = [c for c in row["cells"] if "href" in c]
        folder = os.path.normpath(os.path.join(out, link["href"]))
        assert link["href"].startswith("../../results/") and link["href"].endswith("/")
        assert os.path.isdir(folder) and os.path.basename(folder) == link["text"], link
        assert os.path.exists(os.path.join(folder, "plan.json")) or row["cells"][2]["text"] == "unpruned"
    md_links = re.findall(r"\| \[([^\]]+)\]\(([^)]+)\) \|$", board["md"], re.M)
    assert len(md_links) == 13
    for text, href in md_links:
        assert os.path.isdir(os.path.join(out, href)) and os.path.basename(os.path.normpath(href)) == text
    # links made for where the files will be read from, not where they were written
    other = tmp_path / "elsewhere"
    write_leaderboard(str(board["root"] / "results"), str(other), MetricSpec(), links_from=str(board["root"]))
    page = Page((other / "leaderboard.html").read_text())
    hrefs = [c["href"] for t in page.tables for r in t["rows"] for c in r["cells"] if "href" in c]
    assert len(hrefs) == 13 and all(h.startswith("results/") for h in hrefs)
    assert all(os.path.isdir(board["root"] / h) for h in hrefs)


def test_a_cell_without_a_folder_has_no_link(tmp_path):
    folder = write_study(str(tmp_path / "results"), [cell("base", "none", 0.0, 0.9), cell("r", "reap", 0.5, 0.6)])
    shutil.rmtree(os.path.join(folder, "cells", "r"))
    write_leaderboard(str(tmp_path / "results"), str(tmp_path / "out"), MetricSpec())
    page = Page((tmp_path / "out" / "leaderboard.html").read_text())
    cells = {r["cells"][2]["text"]: r["cells"][-1] for r in page.tables[0]["rows"]}
    assert cells["reap"] == {"text": "r"} and cells["unpruned"]["href"] == "../results/unc/cells/base/"
    assert "| r |" in (tmp_path / "out" / "leaderboard.md").read_text()
