"""The text of a report: ``report.md`` and the PDF's text pages, from the same rows.

Every table is built once as (header, rows of strings) and written either as a Markdown table or
as fixed-width lines; paths in the report are relative to the report folder.
"""

from __future__ import annotations

import os
import textwrap

import pandas as pd

from moebench.report.domains import GENERIC_SOURCES
from moebench.report.figures import Figure
from moebench.report.textfmt import main_rows, markdown_table, num, plain_table

LIMITED_NOTE = ("`limited`: the cell ran with an lm-eval `limit` (a subset of each task); its numbers are "
                "indicative only and it is left off the leaderboard.")


def settings(study, table, tasks, spec, **_) -> list[str]:
    """The report's settings as sentences."""
    runs = study.runs
    limited = int(runs["limited"].sum())
    calibs = sorted(c for c in runs["calib"].unique() if c)
    lines = [f"cells: {len(runs)}; models: {', '.join(sorted(runs['model'].unique()))}",
             f"methods: {', '.join(sorted(table.loc[~table['baseline'], 'method'].unique())) or '-'}",
             f"ratios: {', '.join(num(r, 2) for r in sorted(runs['ratio'].unique()))}; "
             f"calibration: {', '.join(calibs) or '-'}",
             f"average accuracy: mean over {len(tasks)} task(s) ({', '.join(tasks) or '-'}) of {spec.describe()}; "
             "group aggregates (score rows without a sample count) are left out",
             "recovery: average accuracy / the unpruned cell's (method none, ratio 0) of the same model x 100; "
             "decode speedup: decode tokens/s / the unpruned cell's",
             f"limited runs: {limited} of {len(runs)}" + (" (flagged `limited`; not on the leaderboard)" if limited
                                                          else "")]
    measured = runs[runs["decode_tokens_per_s"].notna()] if "decode_tokens_per_s" in runs else runs.iloc[:0]
    if len(measured):
        where = sorted({f"{r.device} ({r.dtype}, {r.expert_kernel} experts kernel)"
                        for r in measured[["device", "dtype", "expert_kernel"]].astype(str).itertuples()})
        largest = pd.to_numeric(measured.get("parameters"), errors="coerce").max() if "parameters" in measured else None
        small = largest is not None and largest == largest and largest < 1e8
        note = (f" on a CPU, speeds of models this small (at most {largest / 1e6:.1f} M parameters) are dominated "
                "by fixed per-call costs and say little about the methods on real models"
                if small and all(w.startswith("cpu") for w in where) else "")
        lines.append(f"speed and memory measured on: {'; '.join(where)}" + (f";{note}" if note else ""))
    if "mixed_versions" in runs and runs["mixed_versions"].astype(str).str.lower().eq("true").any():
        lines.append("WARNING: the cells differ in lm-eval or task versions (collected with --allow-mixed)")
    return lines


def comparison_rows(comparison) -> tuple[list[str], list[list[str]]]:
    """Measured-beside-published rows."""
    header = ["paper", "table", "model", "method", "ratio", "calibration", "quantity", "published", "measured",
              "difference", "caveat"]
    rows = [[r.paper, r.table, r.model, r.method, num(r.ratio, 2), r.calib or "-", r.quantity, num(r.published, 2),
             num(r.measured, 2), num(r.difference, 2), r.caveat or "-"] for r in comparison.itertuples()]
    return header, rows


def effect_rows(effect) -> tuple[list[str], list[list[str]]]:
    """Calibration-effect rows (scores in %, delta in points)."""
    header = ["model", "method", "ratio", "task", "metric", "generic", "domain", "generic (%)", "domain (%)",
              "delta (points)"]
    rows = [[r.model, r.method, num(r.ratio, 2), r.task, r.metric, r.generic_calib, r.domain_calib,
             num(r.generic, 2, 100), num(r.domain, 2, 100), num(r.delta, 2)] for r in effect.itertuples()]
    return header, rows


def task_rows(table, tasks_frame, used) -> tuple[list[str], list[list[str]]]:
    """Per-task rows: one per cell, a column per leaf task (its metric in the header), in %."""
    header = ["model", "method", "calibration", "ratio"] + [f"{t} ({m})" for t, (m, _) in used.items()]
    rows = [[r.model, r.method, r.calib or "-", num(r.ratio, 2)] +
            [num(tasks_frame.at[r.cell, t], 2, 100) for t in used] for r in table.itertuples()]
    return header, rows


def reference_rows(references) -> tuple[list[str], list[list[str]]]:
    """Published numbers about the study's models."""
    header = ["paper", "venue", "table", "model", "method", "ratio", "calibration", "quantity", "value", "source"]
    rows = [[e.short, e.venue, e.table, e.model,
             ("unpruned" if e.method == "none" else e.method) + (f"+skip:{e.skip}" if e.skip != "none" else ""),
             num(e.ratio, 2), e.calibration or "-", e.quantity, num(e.value, 2 if e.scale != 1 else 3), e.source]
            for e in references]
    return header, rows


def _figure_lines(figures, folder) -> list[str]:
    lines, k = [], 0
    for item in figures:
        if isinstance(item, Figure):
            k += 1
            png, pdf = (os.path.relpath(p, folder) for p in item.paths)
            lines += [f"### Figure {k}: {item.title}", "", item.caption, "", f"![{item.title}]({png})", "",
                      f"PDF: [{pdf}]({pdf})", ""]
        else:
            lines += [f"### {item.title} (not drawn)", "", f"Skipped: {item.note}.", ""]
    return lines


def report_markdown(study, table, tasks, spec, tasks_frame, used, effect, comparison, references, figures, tex,
                    folder, **_) -> str:
    """The whole ``report.md``."""
    sources = "`runs`, `scores`" + (", `latency`" if study.latency is not None else "")
    plans = f" and {len(study.plans)} cell plan.json files" if study.plans else ""
    out = [f"# moebench report: {study.name}", "",
           f"Made by `moebench report` from the study's tidy tables ({sources}){plans}. "
           "Regenerating from the same tables gives identical files.", "", "## Settings", ""]
    out += [f"- {line}" for line in settings(study, table, tasks, spec)] + ["", "## Main table", ""]
    out += [markdown_table(*main_rows(table), numeric_from=3), "", LIMITED_NOTE, "", "## Measured beside published", ""]
    out += ([markdown_table(*comparison_rows(comparison), numeric_from=7), "",
             "Published numbers are the papers' (see Appendix B for sources); measured numbers are computed the "
             "paper's way (its metric and tasks) from this study's cells.", ""] if not comparison.empty else
            ["No cell of this study matches a published setting (model, method, ratio, calibration).", ""])
    out += ["## Figures", "", *_figure_lines(figures, folder)]
    out += ["## Calibration-domain effect", "",
            f"Generic calibration sources: {', '.join(GENERIC_SOURCES)}; every other source is a domain source, "
            "compared on its own domain tasks (tasks whose name contains the domain, e.g. testbed:arithmetic -> "
            "testbed_arithmetic) at the same method and ratio.", ""]
    out += ([markdown_table(*effect_rows(effect), numeric_from=7), ""] if not effect.empty else
            ["No method and ratio has cells with both a generic and a domain calibration source.", ""])
    out += ["## Appendix A: per-task scores (%)", "", markdown_table(*task_rows(table, tasks_frame, used),
                                                                     numeric_from=3), ""]
    out += ["## Appendix B: published numbers for this study's models", ""]
    out += ([markdown_table(*reference_rows(references)), ""] if references else
            ["No published numbers in moebench's data concern this study's models.", ""])
    out += ["## Files", "", "- `report.pdf`: this report with every figure"]
    out += [f"- `{os.path.relpath(p, folder)}`: LaTeX table (booktabs)" for p in tex]
    return "\n".join(out) + "\n"


def section_texts(study, table, tasks, spec, tasks_frame, used, effect, comparison, references, figures,
                  **_) -> list[tuple[str, list[str]]]:
    """The PDF's text pages: (title, lines)."""
    drawn = [f for f in figures if isinstance(f, Figure)]
    items = [f"- {line}" for line in settings(study, table, tasks, spec)]
    items += ["", "Figures (one per page after the tables):"]
    items += [f"  Figure {i}: {f.title}. {f.caption}" for i, f in enumerate(drawn, 1)]
    items += [f"  not drawn: {f.title}: {f.note}" for f in figures if not isinstance(f, Figure)]
    head = [part for line in items for part in (textwrap.wrap(line, 130, subsequent_indent="    ") or [""])]
    sections = [(f"moebench report: {study.name}", head),
                ("Main table", [*plain_table(*main_rows(table)), "", LIMITED_NOTE.replace("`", "")])]
    if not comparison.empty:
        sections.append(("Measured beside published", plain_table(*comparison_rows(comparison))))
    if not effect.empty:
        sections.append(("Calibration-domain effect", plain_table(*effect_rows(effect))))
    sections.append(("Appendix A: per-task scores (%)", plain_table(*task_rows(table, tasks_frame, used))))
    if references:
        sections.append(("Appendix B: published numbers for this study's models",
                         plain_table(*reference_rows(references))))
    return sections
