"""A study's tidy tables -> ``reports/<study>/`` (the `moebench report` command is `moebench.cli.report`).

Writes ``report.md``, ``report.pdf``, ``figures/<name>.{png,pdf}`` and booktabs LaTeX tables
``tables/*.tex``. ``RESULTS_DIR`` is a study's results folder (``results/<study>``, holding
``tables/``) or a folder of them; each study gets its own report. Figures that need data a study
lacks (latency table, plans, domain calibrations, speed measurements, recovered cells) are skipped with a note.
Output is deterministic: same tables, same bytes.
"""

from __future__ import annotations

import os
import shutil

from moebench.report import figures as F
from moebench.report import latex, maps, pdf, published, style
from moebench.report.domains import calibration_effect
from moebench.report.markdown import pdf_document, report_markdown
from moebench.report.tables import MetricSpec, StudyData, averaged_tasks, per_task, summary
from moebench.report.textfmt import main_rows, num
from moebench.util import atomic_write_text, check_name, path_under

GENERATED = ("report.md", "report.pdf", "figures", "tables")


def draw_figures(study: StudyData, table, effect, spec: MetricSpec) -> list:
    """Every figure of the report (`figures.Figure`, open) or why it was not drawn (`figures.Skipped`), in
    report order. Each method has one colour and marker in all of them (`style.report_styles`, fixed here
    once for the report)."""
    measure = study.spec.get("measure")
    reps = measure.get("reps") if isinstance(measure, dict) else None
    styles = style.report_styles(table, effect)
    out = [F.accuracy_vs_ratio(table, spec.describe().replace("`", ""), styles), F.recovery_vs_ratio(table, styles),
           F.memory_pareto(table, styles), F.speedup_vs_ratio(table, reps, styles),
           maps.latency_vs_input(study.latency, table), F.recovery_heatmap(table),
           F.recovery_after_finetune(table, styles, study.runs), F.calibration_effect(effect, table, styles)]
    kept = maps.kept_expert_maps(study.plans, table)
    return out + (kept if isinstance(kept, list) else [kept])


def _clean(folder: str) -> None:
    for name in GENERATED:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _latex(folder: str, study: StudyData, table, tasks_frame, used, effect, comparison) -> list[str]:
    header, rows = main_rows(table)
    paths = [latex.write(os.path.join(folder, "tables", "main.tex"), latex.booktabs(
        [*header[:-1], "limited"], [[*r[:-1], "yes" if r[-1] != "-" else ""] for r in rows],
        f"{study.name}: average accuracy, recovery, memory and speed per model, method and ratio.",
        f"tab:{study.name}-main", numeric_from=3))]
    cells = dict(zip(table["cell"], zip(table["model"], table["method"], table["calib"], table["ratio"], strict=True),
                     strict=True))
    task_rows = [[m, meth, c or "-", num(r, 2)] + [num(tasks_frame.at[cell, t], 2, 100) for t in used]
                 for cell, (m, meth, c, r) in cells.items()]
    paths.append(latex.write(os.path.join(folder, "tables", "per_task.tex"), latex.booktabs(
        ["model", "method", "calibration", "ratio"] + [f"{t} ({mf[0]})" for t, mf in used.items()], task_rows,
        f"{study.name}: per-task scores (%).", f"tab:{study.name}-tasks", numeric_from=3)))
    if not effect.empty:
        eff_rows = [[r.model, r.method, num(r.ratio, 2), r.task, r.generic_calib, r.domain_calib,
                     num(r.generic, 2, 100), num(r.domain, 2, 100), num(r.delta, 2)] for r in effect.itertuples()]
        paths.append(latex.write(os.path.join(folder, "tables", "calibration_effect.tex"), latex.booktabs(
            ["model", "method", "ratio", "task", "generic", "domain", "generic (%)", "domain (%)", "delta"],
            eff_rows, f"{study.name}: generic vs domain calibration on domain tasks.",
            f"tab:{study.name}-calibration", numeric_from=6)))
    if not comparison.empty:
        cmp_rows = [[r.paper, r.model, r.method, num(r.ratio, 2), r.calib or "-", r.quantity, num(r.published, 2),
                     num(r.measured, 2), num(r.difference, 2)] for r in comparison.itertuples()]
        paths.append(latex.write(os.path.join(folder, "tables", "published.tex"), latex.booktabs(
            ["paper", "model", "method", "ratio", "calibration", "quantity", "published", "measured", "difference"],
            cmp_rows, f"{study.name}: measured beside published numbers.", f"tab:{study.name}-published",
            numeric_from=6)))
    return paths


def build_report(study: StudyData, out_root: str, spec: MetricSpec, domain_overrides: dict | None = None) -> dict:
    """Write one study's report under ``<out_root>/<study>/``; returns the main paths."""
    folder = path_under(out_root, check_name(study.name, "study name (the 'study' field of cell.json)"))
    os.makedirs(folder, exist_ok=True)
    _clean(folder)
    table = summary(study, spec)
    tasks = averaged_tasks(study.scores, spec)
    tasks_frame, used = per_task(study, spec)
    effect = calibration_effect(study, table, spec, domain_overrides)
    comparison = published.compare(study, table)
    refs = published.references(sorted(table["model"].unique()))
    with style.figure_style():
        drawn = draw_figures(study, table, effect, spec)
        for item in drawn:
            if isinstance(item, F.Figure):
                item.paths = style.save_figure(item.fig, os.path.join(folder, "figures", item.name))
        tex = _latex(folder, study, table, tasks_frame, used, effect, comparison)
        context = {"study": study, "table": table, "tasks": tasks, "spec": spec, "tasks_frame": tasks_frame,
                   "used": used, "effect": effect, "comparison": comparison, "references": refs, "figures": drawn,
                   "tex": tex, "folder": folder}
        atomic_write_text(os.path.join(folder, "report.md"), report_markdown(**context))
        numbered = [x for x in drawn if isinstance(x, F.Figure)]
        pdf.write_pdf(os.path.join(folder, "report.pdf"), **pdf_document(**context))
        for item in numbered:
            style.close(item.fig)
    return {"report.md": os.path.join(folder, "report.md"), "report.pdf": os.path.join(folder, "report.pdf"),
            "figures": [p for x in drawn if isinstance(x, F.Figure) for p in x.paths], "tables": tex}
