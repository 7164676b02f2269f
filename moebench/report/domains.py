"""The calibration-domain effect: generic vs domain calibration, scored on the domain's own tasks.

Rule. A calibration source is **generic** when it is ``c4`` or ``testbed:mix`` (`GENERIC_SOURCES`);
every other source is a **domain** source. A domain source's **domain tasks** are the leaf tasks
whose name contains the source's domain token as one of its ``_``-separated parts (or a part that
starts with it): ``testbed:arithmetic`` -> ``testbed_arithmetic``, ``testbed_arithmetic_gen``;
``math`` -> ``hendrycks_math``, ``minerva_math500``; ``gsm8k`` -> ``gsm8k``. The token is the part
after ``testbed:``, the dataset name of ``hf:`` sources, the file stem of ``file:`` sources, or the
preset name. Overrides (``SOURCE=TASK,TASK``) replace the rule for a source (e.g. ``code=humaneval``).
For every method and ratio that has cells with both a generic and a domain source, each domain task
is compared: domain minus generic, in points of the task's metric (see `tables.task_metric`), with
the stderr of that difference (paired on per-item results where both cells have them, see
`moebench.report.uncertainty`).
"""

from __future__ import annotations

import os

import pandas as pd

from moebench.report.tables import MetricSpec, StudyData, leaf_tasks, task_metric, task_values
from moebench.report.uncertainty import task_difference

GENERIC_SOURCES = ("c4", "testbed:mix")
COLUMNS = ["model", "method", "ratio", "task", "metric", "generic_calib", "domain_calib", "generic", "domain", "delta",
           "delta_stderr", "delta_test", "generic_cell", "domain_cell"]


def domain_token(calib: str) -> str:
    """The word that names a calibration source's domain."""
    kind, sep, rest = calib.partition(":")
    if not sep:
        return calib.lower()
    if kind == "hf":
        return rest.split(":")[0].split("/")[-1].lower()
    if kind == "file":
        return os.path.splitext(os.path.basename(rest.split("#")[0]))[0].lower()
    return rest.lower()


def domain_tasks(calib: str, tasks: list[str], overrides: dict | None = None) -> list[str]:
    """The tasks of ``tasks`` that belong to the domain of source ``calib`` (see module rule)."""
    if overrides and calib in overrides:
        return [t for t in overrides[calib] if t in tasks]
    token = domain_token(calib)
    return [t for t in tasks if any(p == token or p.startswith(token) for p in t.lower().split("_"))]


def parse_overrides(items: list[str] | None) -> dict[str, list[str]]:
    """``["code=humaneval,mbpp"]`` -> ``{"code": ["humaneval", "mbpp"]}``."""
    out = {}
    for item in items or []:
        source, sep, tasks = item.rpartition("=")
        if not sep or not source:
            raise ValueError(f"--domain-tasks {item!r} must look like SOURCE=TASK[,TASK]")
        out[source] = [t for t in tasks.split(",") if t]
    return out


def calibration_effect(study: StudyData, table: pd.DataFrame, spec: MetricSpec,
                       overrides: dict | None = None) -> pd.DataFrame:
    """Rows comparing generic and domain calibration per (model, method, ratio, domain task)."""
    tasks = leaf_tasks(study.scores)
    rows = []
    pruned = table[~table["baseline"] & (table["calib"] != "")]
    for (model, method, ratio), group in pruned.groupby(["model", "method", "ratio"], sort=True):
        by_calib = dict(zip(group["calib"], group["cell"], strict=True))
        generic = [c for c in sorted(by_calib) if c in GENERIC_SOURCES]
        for domain in sorted(c for c in by_calib if c not in GENERIC_SOURCES):
            for task in domain_tasks(domain, tasks, overrides):
                choice = task_metric(study.scores, task, spec)
                if choice is None:
                    continue
                values = task_values(study.scores, task, *choice)
                for source in generic:
                    g, d = values.get(by_calib[source]), values.get(by_calib[domain])
                    if g is None or d is None or pd.isna(g) or pd.isna(d):
                        continue
                    diff = task_difference(study, table, by_calib[domain], by_calib[source], task, spec)
                    rows.append({"model": model, "method": method, "ratio": ratio, "task": task,
                                 "metric": choice[0], "generic_calib": source, "domain_calib": domain,
                                 "generic": g, "domain": d, "delta": 100.0 * (d - g),
                                 "delta_stderr": diff.stderr if diff else None, "delta_test": diff.test if diff
                                 else "none", "generic_cell": by_calib[source], "domain_cell": by_calib[domain]})
    return pd.DataFrame(rows, columns=COLUMNS)
