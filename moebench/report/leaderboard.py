"""`moebench leaderboard`: every study's results -> ``reports/leaderboard.md`` and ``leaderboard.html``.

One row per finished, unlimited cell (cells run with an lm-eval ``limit`` are left out and
counted), grouped by ratio, then by model, best recovery first within each group, accuracy as
mean ± stderr. Two sections, never ranked together: **pruned** variants, whose removed experts
leave memory, and **resident** variants (input-aware selection, kind ``select``, and
``apply=mask``), which keep every expert in memory, so their ratio is the share each input does not
use, not memory freed; both show the resident weight bytes. Each row ends with its cell id, linked
to the cell's folder (``<results>/<study>/cells/<id>/``: plan, results, logs) by a path relative to
the leaderboard file; a cell without a folder has no link. A method name ending in ``+lora``,
``+router_kd`` or ``+full`` is a cell trained after pruning (`moebench.method.recover`); the intro says so
whenever such a row is listed.

``leaderboard.md`` has a table per ratio in each section. ``leaderboard.html`` is static (a few
lines of inline JavaScript, no server, no external files, works offline): one table per section, a
ratio selector showing one ratio or all, and headers that sort on a click: score columns
(accuracy, recovery, speedup) best first, that is descending, memory columns ascending (smallest
first), names and the ratio ascending; a second click reverses. Every name is escaped (HTML in the
page, `textfmt.md_escape` in Markdown). Regeneration is deterministic: fixed order and number
formats, no timestamps.
"""

from __future__ import annotations

import html
import os
from urllib.parse import quote

import pandas as pd

from moebench.report.tables import MetricSpec, averaged_tasks, load_studies, summary
from moebench.report.textfmt import RECOVERED_NOTE, has_recovered, main_rows, markdown_table, md_escape, num
from moebench.util import atomic_write_text

SORT_SCRIPT = """
function sortBy(th) {
  const table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  const dir = th.dataset.dir ? (th.dataset.dir === "asc" ? "desc" : "asc") : (th.dataset.first || "asc");
  for (const other of table.tHead.rows[0].cells) { delete other.dataset.dir; }
  th.dataset.dir = dir;
  const key = (row) => {
    const cell = row.cells[col], v = cell.dataset.v;
    return v === undefined ? cell.textContent : (v === "" ? NaN : parseFloat(v));
  };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (typeof x === "number" && typeof y === "number") {
      if (isNaN(x)) return isNaN(y) ? 0 : 1;
      if (isNaN(y)) return -1;
      return dir === "asc" ? x - y : y - x;
    }
    return dir === "asc" ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
  });
  rows.forEach((row) => body.appendChild(row));
}
function showRatio(value) {
  for (const row of document.querySelectorAll("tbody tr")) {
    row.hidden = value !== "" && row.dataset.ratio !== value;
  }
}
"""
STYLE = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ccc; }
th { cursor: pointer; background: #f2f2f2; text-align: left; }
th[data-dir="asc"]::after { content: " \\25B2"; }
th[data-dir="desc"]::after { content: " \\25BC"; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
"""
NUMERIC_FROM = 4  # study, model, method, calibration are text; the rest are numbers (and the cell id, last)
# First sort direction of each column of `main_rows` (with the study) + the cell id: best first for scores.
FIRST_SORT = ["asc"] * 4 + ["asc", "desc", "desc", "asc", "asc", "desc", "asc", "asc"]
CELL_HEADER = "cell (files)"
SECTIONS = (("pruned", "Pruned: removed experts leave memory"),
            ("resident", "Input-aware and masked: every expert stays in memory"))
SECTION_NOTES = {"pruned": "Grouped by ratio, ranked by recovery within each model and ratio.",
                 "resident": "Input-aware methods choose the experts per input and masked variants only stop "
                             "routing to them: the ratio is the share of experts an input does not use, nothing is "
                             "freed (see the resident weights), so these rows are ranked among themselves, not beside "
                             "physically pruned ones."}


def section_of(row) -> str:
    """``resident`` for input-aware (kind ``select``) and masked (``apply=mask``) cells, else ``pruned``."""
    return "resident" if row["kind"] == "select" or row["apply"] == "mask" else "pruned"


def leaderboard_table(results_dir: str, spec: MetricSpec) -> tuple[pd.DataFrame, int, list[str]]:
    """(rows of every study's unlimited cells, number of limited cells left out, averaged tasks per study).
    Rows carry ``cell_dir``, the cell's folder (``""`` where it has none)."""
    frames, limited, notes = [], 0, []
    for study in load_studies(results_dir):
        table = summary(study, spec).assign(study=study.name)
        table["cell_dir"] = [study.cell_dirs.get(c, "") for c in table["cell"]]
        limited += int(table["limited"].sum())
        frames.append(table[~table["limited"]])
        notes.append(f"{study.name}: {', '.join(averaged_tasks(study.scores, spec)) or '-'}")
    rows = pd.concat(frames, ignore_index=True)
    rows["section"] = [section_of(r) for _, r in rows.iterrows()] if len(rows) else []
    rows["neg_recovery"] = -rows["recovery"].fillna(-1e9)
    rows["order"] = rows["section"].map({k: i for i, (k, _) in enumerate(SECTIONS)})
    rows = rows.sort_values(["order", "ratio", "model", "neg_recovery", "method", "calib", "study", "cell"])
    return rows.drop(columns=["neg_recovery", "order"]).reset_index(drop=True), limited, notes


def cell_link(cell_dir: str, links_from: str) -> str:
    """The URL of a cell's folder relative to the folder ``links_from`` (where the leaderboard is written),
    with a trailing slash and every unsafe character percent-encoded; ``""`` without a folder."""
    if not cell_dir:
        return ""
    rel = os.path.relpath(os.path.abspath(cell_dir), os.path.abspath(links_from))
    return quote(rel.replace(os.sep, "/")) + "/"


def ratio_key(ratio) -> str:
    """A ratio as the selector and the Markdown groups name it (``0.25``)."""
    return num(ratio, 2)


def _html_table(header: list[str], rows: list[list[str]], values: list[list], ratios: list[str],
                links: list[str]) -> str:
    head = "".join(f'<th onclick="sortBy(this)" data-first="{first}">{html.escape(h)}</th>'
                   for h, first in zip(header, FIRST_SORT, strict=True))
    body = []
    for text_row, value_row, ratio, link in zip(rows, values, ratios, links, strict=True):
        cells = []
        for i, (text, value) in enumerate(zip(text_row, value_row, strict=True)):
            if i == len(text_row) - 1:  # the cell id, linked to its folder
                inner = f'<a href="{html.escape(link)}">{html.escape(text)}</a>' if link else html.escape(text)
                cells.append(f"<td>{inner}</td>")
            elif i >= NUMERIC_FROM:
                v = "" if value is None or pd.isna(value) else repr(float(value))
                cells.append(f'<td class="n" data-v="{v}">{html.escape(text)}</td>')
            else:
                cells.append(f"<td>{html.escape(text)}</td>")
        body.append(f'<tr data-ratio="{html.escape(ratio)}">' + "".join(cells) + "</tr>")
    return "<table>\n<thead><tr>" + head + "</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>\n"


def _selector(ratios: list[str]) -> str:
    options = "".join(f'<option value="{html.escape(r)}">{html.escape(r)}</option>' for r in ratios)
    return ('<p><label for="ratio">Ratio: </label><select id="ratio" onchange="showRatio(this.value)">'
            f'<option value="">all</option>{options}</select> (rows are grouped by ratio; click a header to sort: '
            "scores best first, memory smallest first, names A-Z; again to reverse)</p>\n")


def _html(sections: list[dict], intro: list[str]) -> str:
    paragraphs = "\n".join(f"<p>{html.escape(p.replace('`', ''))}</p>" for p in intro)
    ratios = sorted({r for sec in sections for r in sec["ratios"]}, key=float)
    parts = "".join(f"<h2>{html.escape(sec['title'])}</h2>\n<p>{html.escape(sec['note'])}</p>\n"
                    + _html_table(sec["header"], sec["text"], sec["values"], sec["ratios"], sec["links"])
                    for sec in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>moebench leaderboard</title>\n<style>" + STYLE + "</style>\n<script>" + SORT_SCRIPT +
            "</script>\n</head>\n<body>\n<h1>moebench leaderboard</h1>\n" + paragraphs + "\n" +
            (_selector(ratios) if ratios else "") + parts + "</body>\n</html>\n")


def _section(rows: pd.DataFrame, everything: pd.DataFrame, links_from: str) -> dict:
    header, text = main_rows(rows, with_study=True, units_of=everything)  # limited cells are not listed
    header[-1] = "speed flags"
    values = [[None] * 4 + [r.ratio, r.accuracy, r.recovery, r.weight_bytes, r.run_peak_bytes, r.decode_speedup,
                            None, None] for r in rows.itertuples()]
    return {"header": [*header, CELL_HEADER], "text": [[*t, c] for t, c in zip(text, rows["cell"], strict=True)],
            "values": values, "ratios": [ratio_key(r) for r in rows["ratio"]],
            "links": [cell_link(d, links_from) for d in rows["cell_dir"]]}


def _markdown_section(sec: dict) -> list[str]:
    """A section as a Markdown table per ratio, the cell id linked to its folder."""
    out = []
    for ratio in sorted(set(sec["ratios"]), key=float):
        picked = [i for i, r in enumerate(sec["ratios"]) if r == ratio]
        rows = [[*sec["text"][i][:-1], sec["text"][i][-1], sec["links"][i]] for i in picked]
        out += [f"### Ratio {ratio}", "", markdown_table(sec["header"], rows, NUMERIC_FROM, link_last=True), ""]
    return out


def write_leaderboard(results_dir: str, out: str, spec: MetricSpec, links_from: str | None = None) -> list[str]:
    """Write ``leaderboard.md`` and ``leaderboard.html`` under ``out``; returns their paths. Cell links are
    relative to ``links_from`` (default ``out``): the folder the files are read from."""
    rows, limited, notes = leaderboard_table(results_dir, spec)
    links_from = out if links_from is None else links_from
    intro = [f"Average accuracy: {spec.describe()}, over each study's tasks "
             "(leaf tasks reporting the metric), mean \u00b1 standard error in percent; recovery in % of the same "
             "model's unpruned cell; resident weights: the bytes the variant keeps in memory (computed); run peak: "
             "the memory measured at its peak while the variant was evaluated and timed (GPU: bytes torch "
             "allocated; CPU: the cell process's peak resident set, runtime included); decode speedup: paired with "
             "the unpruned model in the cell's process, median [95% interval]; speed flags: unpaired or under load, "
             "no verdict; cell (files): the cell's folder with its plan, results and logs.",
             f"{len(rows)} cells from {len(notes)} stud{'y' if len(notes) == 1 else 'ies'}; {limited} cells run with "
             "an lm-eval limit are left out.", "Tasks per study: " + "; ".join(notes) + "."]
    if has_recovered(rows):  # only then, so leaderboards without recovered cells read as before
        intro.append(RECOVERED_NOTE[0].upper() + RECOVERED_NOTE[1:])
    sections = []
    for key, title in SECTIONS:
        part = rows[rows["section"] == key] if len(rows) else rows
        if len(part) or key == "pruned":
            sections.append({"title": title, "note": SECTION_NOTES[key], **_section(part, rows, links_from)})
    md = ["# moebench leaderboard", "", "Generated by `moebench leaderboard` from the results tables; do not edit by "
          "hand.", "", *[line for p in intro for line in (md_escape(p.replace("`", "")), "")]]
    for sec in sections:
        md += [f"## {sec['title']}", "", sec["note"], "", *_markdown_section(sec)]
    if not len(rows):
        md += ["No cell qualifies yet: every finished cell ran with an lm-eval limit.", ""]
    os.makedirs(out, exist_ok=True)
    md_path, html_path = os.path.join(out, "leaderboard.md"), os.path.join(out, "leaderboard.html")
    atomic_write_text(md_path, "\n".join(md).rstrip("\n") + "\n", root=out)
    atomic_write_text(html_path, _html(sections, intro), root=out)
    return [md_path, html_path]
