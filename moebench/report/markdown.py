"""The text of a report: ``report.md`` and the PDF's blocks (`moebench.report.pdf`), from the same rows.

Every table is built once as (header, rows of strings) and written either as a Markdown table or
typeset in the PDF; names from the results are escaped (`textfmt.md_escape`) wherever they reach
Markdown; paths in the report are relative to the report folder. A section without data (no
published setting matched, no calibration-domain pairs, no published numbers, a figure whose data
are missing) is not written as an empty heading: it is named, with the reason, in a last "Not in
this report" list, in ``report.md`` and in the PDF alike.
"""

from __future__ import annotations

import os

from moebench.report import pdf
from moebench.report.domains import GENERIC_SOURCES
from moebench.report.layout import Figure
from moebench.report.settings import settings_pairs
from moebench.report.textfmt import RECOVERED_NOTE, has_recovered, main_rows, markdown_table, md_escape, num, pm

MAIN_NOTE = ("avg acc: mean \u00b1 standard error over the averaged tasks' items, in percent; weights: the bytes "
             "resident in memory (input-aware and masked variants free nothing); run peak: memory measured at its "
             "peak while evaluated and timed; decode speedup: paired with the unpruned model, median [95% interval]; "
             "flags: `limited` (lm-eval limit), `unpaired` / `under load` (no speed verdict).")
LIMITED_NOTE = ("`limited`: the cell ran with an lm-eval `limit` (a subset of each task); its numbers are "
                "indicative only and it is left off the leaderboard.")


def settings(study, table, tasks, spec, **_) -> list[str]:
    """The report's settings as Markdown list text (``name: value``, escaped)."""
    return [f"{name}: {md_escape(value)}" for name, value in settings_pairs(study, table, tasks, spec)]


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
              "delta \u00b1 stderr (points)", "test"]
    rows = [[r.model, r.method, num(r.ratio, 2), r.task, r.metric, r.generic_calib, r.domain_calib,
             num(r.generic, 2, 100), num(r.domain, 2, 100), pm(r.delta, r.delta_stderr, 2), r.delta_test]
            for r in effect.itertuples()]
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
            png, pdf_path = (os.path.relpath(p, folder) for p in item.paths)
            title = md_escape(item.title)
            lines += [f"### Figure {k}: {title}", "", md_escape(item.caption), "", f"![{title}]({png})", "",
                      f"PDF: [{pdf_path}]({pdf_path})", ""]
    return lines


def left_out(effect, comparison, references, figures, used) -> list[tuple[str, str]]:
    """(section or figure title, why) for every part a report leaves out for want of data: sections
    without rows are not written (no empty headings), only named here."""
    out = []
    if comparison.empty:
        out.append(("Measured beside published", "no cell of this study matches a published setting (model, "
                                                  "method, ratio, calibration)"))
    out += [(f.title, f.note) for f in figures if not isinstance(f, Figure)]
    if effect.empty:
        out.append(("Calibration-domain effect", "no method and ratio has cells with both a generic and a domain "
                                                 "calibration source"))
    if not used:
        out.append(("Per-task scores", "no task reports a metric"))
    if not references:
        out.append(("Published numbers", "no published numbers in moebench's data concern this study's models"))
    first = {}
    for title, why in out:  # a figure and a table of the same name are one entry (the figure's reason)
        first.setdefault(title, why)
    return list(first.items())


def appendices(used, references) -> dict[str, str]:
    """Appendix letter of each appendix the report has: ``tasks`` (per-task scores), ``published``."""
    present = [k for k, on in (("tasks", bool(used)), ("published", bool(references))) if on]
    return {k: "ABCDEFGH"[i] for i, k in enumerate(present)}


def report_markdown(study, table, tasks, spec, tasks_frame, used, effect, comparison, references, figures, tex,
                    folder, **_) -> str:
    """The whole ``report.md``: sections with data only, then the list of what was left out and why."""
    sources = "`runs`, `scores`" + (", `latency`" if study.latency is not None else "")
    plans = f" and {len(study.plans)} cell plan.json files" if study.plans else ""
    letters = appendices(used, references)
    out = [f"# moebench report: {md_escape(study.name)}", "",
           f"Made by `moebench report` from the study's tidy tables ({sources}){plans}. "
           "Regenerating from the same tables gives identical files.", "", "## Settings", ""]
    out += [f"- {line}" for line in settings(study, table, tasks, spec)] + ["", "## Main table", ""]
    out += [markdown_table(*main_rows(table), numeric_from=3), "", MAIN_NOTE, "", LIMITED_NOTE, ""]
    if has_recovered(table):
        out += [RECOVERED_NOTE[0].upper() + RECOVERED_NOTE[1:], ""]
    if not comparison.empty:
        see = f" (see Appendix {letters['published']} for sources)" if "published" in letters else ""
        out += ["## Measured beside published", "", markdown_table(*comparison_rows(comparison), numeric_from=7), "",
                f"Published numbers are the papers'{see}; measured numbers are computed the paper's way (its metric "
                "and tasks) from this study's cells.", ""]
    drawn = _figure_lines(figures, folder)
    if drawn:
        out += ["## Figures", "", *drawn]
    if not effect.empty:
        out += ["## Calibration-domain effect", "",
                f"Generic calibration sources: {', '.join(GENERIC_SOURCES)}; every other source is a domain source, "
                "compared on its own domain tasks (tasks whose name contains the domain, e.g. testbed:arithmetic -> "
                "testbed_arithmetic) at the same method and ratio.", "",
                markdown_table(*effect_rows(effect), numeric_from=7), ""]
    if "tasks" in letters:
        out += [f"## Appendix {letters['tasks']}: per-task scores (%)", "",
                markdown_table(*task_rows(table, tasks_frame, used), numeric_from=3), ""]
    if "published" in letters:
        out += [f"## Appendix {letters['published']}: published numbers for this study's models", "",
                markdown_table(*reference_rows(references)), ""]
    missing = left_out(effect, comparison, references, figures, used)
    if missing:
        out += ["## Not in this report", "", "Left out for want of data:", ""]
        out += [f"- {md_escape(title)}: {md_escape(why)}." for title, why in missing] + [""]
    out += ["## Files", "", "- `report.pdf`: this report with every figure"]
    out += [f"- `{os.path.relpath(p, folder)}`: LaTeX table (booktabs)" for p in tex]
    return "\n".join(out) + "\n"


def pdf_document(study, table, tasks, spec, tasks_frame, used, effect, comparison, references, figures,
                 **_) -> dict:
    """The PDF's parts: title page (title, subtitle, settings), blocks (`pdf.Table`, `pdf.Text`), figures;
    the same sections as ``report.md`` (those without data left out and listed last)."""
    drawn = [f for f in figures if isinstance(f, Figure)]
    letters = appendices(used, references)
    recovered = " " + RECOVERED_NOTE[0].upper() + RECOVERED_NOTE[1:] if has_recovered(table) else ""
    blocks = [pdf.Table("Main table", *main_rows(table), numeric_from=3, group=1,
                        note=MAIN_NOTE + " " + (LIMITED_NOTE + recovered).replace("`", ""))]
    if not comparison.empty:
        blocks.append(pdf.Table("Measured beside published", *comparison_rows(comparison), numeric_from=7, group=0,
                                note="Published numbers are the papers'; measured ones are computed the paper's way."))
    if not effect.empty:
        blocks.append(pdf.Table("Calibration-domain effect", *effect_rows(effect), numeric_from=7, group=1))
    if "tasks" in letters:
        blocks.append(pdf.Table(f"Appendix {letters['tasks']}: per-task scores (%)",
                                *task_rows(table, tasks_frame, used), numeric_from=3, group=1))
    if "published" in letters:
        blocks.append(pdf.Table(f"Appendix {letters['published']}: published numbers for this study's models",
                                *reference_rows(references), group=0))
    missing = left_out(effect, comparison, references, figures, used)
    if missing:
        blocks.append(pdf.Text("Not in this report", ["Left out for want of data:"] +
                               [f"{title}: {why}." for title, why in missing]))
    subtitle = (f"Made by moebench report from the study's tidy tables: {len(study.runs)} cells, "
                f"{len(drawn)} figures. Tables first, then one figure a page.")
    return {"title": (f"moebench report: {study.name}", subtitle, settings_pairs(study, table, tasks, spec)),
            "blocks": blocks, "figures": [(f"Figure {i}: {f.title}", f.caption, f.fig) for i, f in enumerate(drawn, 1)],
            "label": f"moebench report: {study.name}"}
