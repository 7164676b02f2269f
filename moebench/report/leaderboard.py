"""`moebench leaderboard`: every study's results -> ``reports/leaderboard.md`` and ``leaderboard.html``.

One row per finished, unlimited cell (cells run with an lm-eval ``limit`` are left out and
counted), grouped by model, best recovery first within each ratio, accuracy as mean ± stderr. Two
sections, never ranked together: **pruned** variants, whose removed experts leave memory, and
**resident** variants (input-aware selection, kind ``select``, and ``apply=mask``), which keep
every expert in memory, so their ratio is the share each input does not use, not memory freed; both
show the resident weight bytes. The HTML page is static: one sortable table per section (a few
lines of inline JavaScript, no server, no external files). Every name is escaped (HTML in the page,
`textfmt.md_escape` in Markdown). Regeneration is deterministic: fixed order and number formats,
no timestamps.
"""

from __future__ import annotations

import html
import os

import pandas as pd

from moebench.report.tables import MetricSpec, averaged_tasks, load_studies, summary
from moebench.report.textfmt import main_rows, markdown_table, md_escape
from moebench.util import atomic_write_text

SORT_SCRIPT = """
function sortBy(th) {
  const table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  const dir = th.dataset.dir === "asc" ? "desc" : "asc";
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
      if (isNaN(x)) return 1;
      if (isNaN(y)) return -1;
      return dir === "asc" ? x - y : y - x;
    }
    return dir === "asc" ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
  });
  rows.forEach((row) => body.appendChild(row));
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
NUMERIC_FROM = 4  # study, model, method, calibration are text; the rest are numbers
SECTIONS = (("pruned", "Pruned: removed experts leave memory"),
            ("resident", "Input-aware and masked: every expert stays in memory"))
SECTION_NOTES = {"pruned": "Ranked by recovery within each model and ratio.",
                 "resident": "Input-aware methods choose the experts per input and masked variants only stop "
                             "routing to them: the ratio is the share of experts an input does not use, nothing is "
                             "freed (see the resident weights), so these rows are ranked among themselves, not beside "
                             "physically pruned ones."}


def section_of(row) -> str:
    """``resident`` for input-aware (kind ``select``) and masked (``apply=mask``) cells, else ``pruned``."""
    return "resident" if row["kind"] == "select" or row["apply"] == "mask" else "pruned"


def leaderboard_table(results_dir: str, spec: MetricSpec) -> tuple[pd.DataFrame, int, list[str]]:
    """(rows of every study's unlimited cells, number of limited cells left out, averaged tasks per study)."""
    frames, limited, notes = [], 0, []
    for study in load_studies(results_dir):
        table = summary(study, spec).assign(study=study.name)
        limited += int(table["limited"].sum())
        frames.append(table[~table["limited"]])
        notes.append(f"{study.name}: {', '.join(averaged_tasks(study.scores, spec)) or '-'}")
    rows = pd.concat(frames, ignore_index=True)
    rows["section"] = [section_of(r) for _, r in rows.iterrows()] if len(rows) else []
    rows["neg_recovery"] = -rows["recovery"].fillna(-1e9)
    rows["order"] = rows["section"].map({k: i for i, (k, _) in enumerate(SECTIONS)})
    rows = rows.sort_values(["order", "model", "ratio", "neg_recovery", "method", "calib", "study", "cell"])
    return rows.drop(columns=["neg_recovery", "order"]).reset_index(drop=True), limited, notes


def _html_table(header: list[str], rows: list[list[str]], values: list[list]) -> str:
    head = "".join(f'<th onclick="sortBy(this)">{html.escape(h)}</th>' for h in header)
    body = []
    for text_row, value_row in zip(rows, values, strict=True):
        cells = []
        for i, (text, value) in enumerate(zip(text_row, value_row, strict=True)):
            if i >= NUMERIC_FROM:
                v = "" if value is None or pd.isna(value) else repr(float(value))
                cells.append(f'<td class="n" data-v="{v}">{html.escape(text)}</td>')
            else:
                cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>\n<thead><tr>" + head + "</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>\n"


def _html(sections: list[tuple[str, str, list, list, list]], intro: list[str]) -> str:
    paragraphs = "\n".join(f"<p>{html.escape(p.replace('`', ''))}</p>" for p in intro)
    parts = "".join(f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(note)}</p>\n" + _html_table(header, text, values)
                    for title, note, header, text, values in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>moebench leaderboard</title>\n<style>" + STYLE + "</style>\n<script>" + SORT_SCRIPT +
            "</script>\n</head>\n<body>\n<h1>moebench leaderboard</h1>\n" + paragraphs + "\n" + parts +
            "</body>\n</html>\n")


def _section(rows: pd.DataFrame, everything: pd.DataFrame) -> tuple[list[str], list[list[str]], list[list]]:
    header, text = main_rows(rows, with_study=True, units_of=everything)  # limited cells are not listed
    header[-1] = "speed flags"
    values = [[None] * 4 + [r.ratio, r.accuracy, r.recovery, r.weight_bytes, r.run_peak_bytes, r.decode_speedup]
              for r in rows.itertuples()]
    return header, text, [[*v, None] for v in values]


def write_leaderboard(results_dir: str, out: str, spec: MetricSpec) -> list[str]:
    """Write ``leaderboard.md`` and ``leaderboard.html`` under ``out``; returns their paths."""
    rows, limited, notes = leaderboard_table(results_dir, spec)
    intro = [f"Average accuracy: {spec.describe()}, over each study's tasks "
             "(leaf tasks reporting the metric), mean \u00b1 standard error in percent; recovery in % of the same "
             "model's unpruned cell; resident weights: the bytes the variant keeps in memory (computed); run peak: "
             "the memory measured at its peak while the variant was evaluated and timed (GPU: bytes torch "
             "allocated; CPU: the cell process's peak resident set, runtime included); decode speedup: paired with "
             "the unpruned model in the cell's process, median [95% interval]; speed flags: unpaired or under load, "
             "no verdict.",
             f"{len(rows)} cells from {len(notes)} stud{'y' if len(notes) == 1 else 'ies'}; {limited} cells run with "
             "an lm-eval limit are left out.", "Tasks per study: " + "; ".join(notes) + "."]
    sections = []
    for key, title in SECTIONS:
        part = rows[rows["section"] == key] if len(rows) else rows
        if len(part) or key == "pruned":
            sections.append((title, SECTION_NOTES[key], *_section(part, rows)))
    md = ["# moebench leaderboard", "", "Generated by `moebench leaderboard` from the results tables; do not edit by "
          "hand.", "", *[line for p in intro for line in (md_escape(p.replace("`", "")), "")]]
    for title, note, header, text, _ in sections:
        md += [f"## {title}", "", note, "", markdown_table(header, text, NUMERIC_FROM), ""]
    if not len(rows):
        md += ["No cell qualifies yet: every finished cell ran with an lm-eval limit.", ""]
    os.makedirs(out, exist_ok=True)
    md_path, html_path = os.path.join(out, "leaderboard.md"), os.path.join(out, "leaderboard.html")
    atomic_write_text(md_path, "\n".join(md).rstrip("\n") + "\n", root=out)
    atomic_write_text(html_path, _html(sections, intro), root=out)
    return [md_path, html_path]
