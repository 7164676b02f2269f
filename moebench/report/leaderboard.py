"""`moebench leaderboard`: every study's results -> ``reports/leaderboard.md`` and ``leaderboard.html``.

One row per finished, unlimited cell (cells run with an lm-eval ``limit`` are left out and
counted), grouped by model, best recovery first within each ratio. The HTML page is static: one
table, sortable by clicking a column header (a few lines of inline JavaScript, no server, no
external files). Regeneration is deterministic: fixed order and number formats, no timestamps.
"""

from __future__ import annotations

import html
import os

import pandas as pd

from moebench.report.tables import MetricSpec, averaged_tasks, load_studies, summary
from moebench.report.textfmt import main_rows, markdown_table

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


def leaderboard_table(results_dir: str, spec: MetricSpec) -> tuple[pd.DataFrame, int, list[str]]:
    """(rows of every study's unlimited cells, number of limited cells left out, averaged tasks per study)."""
    frames, limited, notes = [], 0, []
    for study in load_studies(results_dir):
        table = summary(study, spec).assign(study=study.name)
        limited += int(table["limited"].sum())
        frames.append(table[~table["limited"]])
        notes.append(f"{study.name}: {', '.join(averaged_tasks(study.scores, spec)) or '-'}")
    rows = pd.concat(frames, ignore_index=True)
    rows["neg_recovery"] = -rows["recovery"].fillna(-1e9)
    rows = rows.sort_values(["model", "ratio", "neg_recovery", "method", "calib", "study", "cell"])
    return rows.drop(columns="neg_recovery").reset_index(drop=True), limited, notes


def _html(header: list[str], rows: list[list[str]], values: list[list], intro: list[str]) -> str:
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
    paragraphs = "\n".join(f"<p>{html.escape(p)}</p>" for p in intro)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>moebench leaderboard</title>\n<style>" + STYLE + "</style>\n<script>" + SORT_SCRIPT +
            "</script>\n</head>\n<body>\n<h1>moebench leaderboard</h1>\n" + paragraphs +
            "\n<table>\n<thead><tr>" + head + "</tr></thead>\n<tbody>\n" + "\n".join(body) +
            "\n</tbody>\n</table>\n</body>\n</html>\n")


def write_leaderboard(results_dir: str, out: str, spec: MetricSpec) -> list[str]:
    """Write ``leaderboard.md`` and ``leaderboard.html`` under ``out``; returns their paths."""
    rows, limited, notes = leaderboard_table(results_dir, spec)
    header, text = main_rows(rows, with_study=True)
    header, text = header[:-1], [r[:-1] for r in text]  # no flags column: limited cells are not listed
    values = [[None] * 4 + [r.ratio, r.accuracy, r.recovery, r.weight_bytes, r.peak_memory_bytes, r.decode_speedup]
              for r in rows.itertuples()]
    intro = [f"Average accuracy: {spec.describe()}, over each study's tasks "
             "(leaf tasks reporting the metric); recovery in % of the same model's unpruned cell; decode speedup "
             "over the unpruned cell.",
             f"{len(rows)} cells from {len(notes)} stud{'y' if len(notes) == 1 else 'ies'}; {limited} cells run with "
             "an lm-eval limit are left out.", "Tasks per study: " + "; ".join(notes) + "."]
    os.makedirs(out, exist_ok=True)
    md_path, html_path = os.path.join(out, "leaderboard.md"), os.path.join(out, "leaderboard.html")
    with open(md_path, "w") as f:
        f.write("# moebench leaderboard\n\nGenerated by `moebench leaderboard` from the results tables; do not edit "
                "by hand.\n\n" + "\n\n".join(intro) + "\n\n" + markdown_table(header, text, NUMERIC_FROM) + "\n"
                + ("" if text else "\nNo cell qualifies yet: every finished cell ran with an lm-eval limit.\n"))
    with open(html_path, "w") as f:
        f.write(_html(header, text, values, intro))
    return [md_path, html_path]
