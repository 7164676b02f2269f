"""Loading a study's tidy tables and deriving the numbers every report shows.

Inputs (written by `moebench collect`): ``<study>/tables/runs.{csv,parquet}`` (columns
`moebench.grid.results.RUN_COLUMNS`), ``scores`` (cell, task, metric, filter, value, stderr, n) and,
when the grid measured it, ``latency`` (see `LATENCY_COLUMNS`); kept-expert maps read
``<study>/cells/<id>/plan.json``, paired comparisons ``cells/<id>/items.csv.gz`` (`moebench.report.uncertainty`).

Definitions:

* **leaf task**: a task whose score rows carry a sample count ``n``. lm-eval reports sample counts
  for evaluated tasks only, so rows without ``n`` are group aggregates and never enter an average.
* **average accuracy** of a cell: the mean over the averaged tasks of each task's metric
  (`MetricSpec`: ``acc`` with filter ``none`` unless configured; per-task overrides such as
  ``acc_norm`` for ARC). The averaged tasks are the leaf tasks that report their metric, or the
  tasks asked for. A cell missing any of them has no average.
* **recovery**: a cell's average accuracy / that of the unpruned cell (method ``none``, ratio 0)
  of the same model, x 100.
* **decode speedup**: the cell's own paired ratio ``decode_speedup`` (`moebench.measure.paired`: the
  median over repetitions of the unpruned reference's time / the variant's, timed interleaved in the
  cell's process, in the same experts kernel), with its p10 and p90. Cells whose speed was not
  paired (``speed_pairing`` other than ``interleaved`` / ``self``) or measured under load are flagged.
* **memory**: resident weights (``weight_bytes``, computed after the method) and the measured
  ``run_peak_bytes`` (`moebench.measure.memory`).
* **stderr of the average**: sqrt(sum of the tasks' squared stderrs) / number of tasks (the tasks'
  items are independent); missing when a task reports no stderr.
* **recovered cell**: a cell trained after its method (``recover`` in the runs table: the JSON of its
  `moebench.method.recover.RecoverSpec`; empty, NaN or absent in tables from before recovery: none).
  Its **twin** is the cell of the same model, method, parameters, skip rule, calibration, ratio and
  apply mode without recovery (`twins`). Not to be confused with the **recovery** column above, which
  is a share of the unpruned accuracy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pandas as pd

from moebench.grid.items import read_items
from moebench.limits import plan_problem
from moebench.report.facets import facet_of, registered_kind

LATENCY_COLUMNS = ["cell", "prompt_len", "batch", "ms_per_token"]
SPEED_COLUMNS = ["decode_tokens_per_s", "decode_tokens_per_s_p90", "decode_tokens_per_s_p10",
                 "decode_tokens_per_s_min", "decode_tokens_per_s_max"]
SPEEDUP_COLUMNS = [f"{p}decode_speedup{q}" for p in ("", "skip_", "default_kernel_") for q in ("", "_lo", "_hi")]
NUMERIC_RUN_COLUMNS = ["ratio", "expert_bytes", "other_bytes", "weight_bytes", "load_peak_bytes", "run_peak_bytes",
                       *SPEED_COLUMNS, *SPEEDUP_COLUMNS, "prefill_tokens_per_s", "parameters", "limit", "others_cpu",
                       "cpu_cores", "load_before", "load_after"]
PAIRED = ("interleaved", "self")  # speed_pairing values whose ratio is paired
FALLBACK_METRICS = ("acc", "exact_match")


@dataclass(frozen=True)
class MetricSpec:
    """Which score is a task's accuracy: ``metric`` and ``filter``, per-task overrides, task subset."""

    metric: str = "acc"
    filter: str = "none"
    task_metrics: dict = field(default_factory=dict)
    tasks: tuple = ()

    def metric_for(self, task: str) -> str:
        """The metric that scores ``task``."""
        return self.task_metrics.get(task, self.metric)

    def describe(self) -> str:
        """One sentence for reports."""
        text = f"metric `{self.metric}` (filter `{self.filter}`)"
        if self.task_metrics:
            text += ", with " + ", ".join(f"`{m}` for {t}" for t, m in sorted(self.task_metrics.items()))
        return text


@dataclass
class StudyData:
    """One study's tables: runs, scores, optional latency, and plan.json contents by cell id."""

    name: str
    runs: pd.DataFrame
    scores: pd.DataFrame
    latency: pd.DataFrame | None = None
    plans: dict = field(default_factory=dict)
    source: str = ""
    cell_dirs: dict = field(default_factory=dict)  # cell id -> its folder, where the study has them
    spec: dict = field(default_factory=dict)  # the study spec (``study.json``), where the study has one
    _items: dict = field(default_factory=dict, repr=False)

    def items(self, cell: str) -> pd.DataFrame | None:
        """The cell's per-item results (`moebench.grid.items`), read once; None when it has none."""
        if cell not in self._items:
            folder = self.cell_dirs.get(cell)
            self._items[cell] = read_items(folder) if folder else None
        return self._items[cell]


def _read(folder: str, name: str) -> pd.DataFrame | None:
    csv, parquet = os.path.join(folder, f"{name}.csv"), os.path.join(folder, f"{name}.parquet")
    if os.path.exists(csv):
        return pd.read_csv(csv, keep_default_na=False, na_values=[""])
    return pd.read_parquet(parquet) if os.path.exists(parquet) else None


def _normalise_runs(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    for col, default in (("calib", ""), ("params", "{}"), ("skip", "none"), ("study", ""), ("apply", "physical"),
                         ("recover", "")):
        runs[col] = (runs[col] if col in runs else pd.Series(default, index=runs.index)).astype(object)
        runs[col] = runs[col].astype(object).where(runs[col].notna(), default).astype(str)
    for col in ("limited", "under_load"):
        values = runs[col] if col in runs else pd.Series(False, index=runs.index)
        runs[col] = values.map(lambda v: str(v).strip().lower() in ("true", "1"))
    for col in ("speed_pairing", "speed_pairing_note", "memory_measure"):
        values = runs[col] if col in runs else pd.Series("", index=runs.index)
        runs[col] = values.astype(object).where(values.notna(), "").astype(str)
    for col in NUMERIC_RUN_COLUMNS:  # tables from older cells lack the speed spread: NaN, said in the report
        runs[col] = pd.to_numeric(runs[col], errors="coerce") if col in runs else float("nan")
    runs["cell"] = runs["cell"].astype(str)
    return runs


def _normalise_scores(scores: pd.DataFrame) -> pd.DataFrame:
    scores = scores.copy()
    scores["filter"] = scores["filter"].astype(object).where(scores["filter"].notna(), "none").astype(str)
    for col in ("value", "stderr", "n"):
        scores[col] = pd.to_numeric(scores[col], errors="coerce")
    scores["cell"] = scores["cell"].astype(str)
    return scores


def _cell_dirs(roots: list[str], cells) -> dict:
    found = {}
    for cell in sorted(cells):
        folder = next((os.path.join(r, "cells", cell) for r in roots if os.path.isdir(os.path.join(r, "cells", cell))),
                      None)
        if folder:
            found[cell] = folder
    return found


def _plans(dirs: dict) -> dict:
    plans = {}
    for cell, folder in dirs.items():
        path = os.path.join(folder, "plan.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    plans[cell] = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"cell {cell}: {path} is not readable JSON ({err}); run the cell again "
                                 "(`moebench grid run`) or remove its folder") from None
            problem = plan_problem(plans[cell])
            if problem:
                raise ValueError(f"cell {cell}: {path}: {problem}; run the cell again (`moebench grid run`) or "
                                 "remove its folder")
    return plans


def _spec(roots: list[str]) -> dict:
    path = next((os.path.join(r, "study.json") for r in roots if os.path.isfile(os.path.join(r, "study.json"))), None)
    if path is None:
        return {}
    with open(path) as f:
        spec = json.load(f).get("spec")
    return spec if isinstance(spec, dict) else {}


def _from_tables(folder: str) -> list[StudyData]:
    tables = os.path.join(folder, "tables")
    runs, scores = _read(tables, "runs"), _read(tables, "scores")
    if runs is None or scores is None:
        return []
    runs, scores, latency = _normalise_runs(runs), _normalise_scores(scores), _read(tables, "latency")
    out = []
    for name in sorted(runs["study"].unique()) or [os.path.basename(os.path.abspath(folder))]:
        part = runs[runs["study"] == name].reset_index(drop=True)
        cells = set(part["cell"])
        study = name or os.path.basename(os.path.abspath(folder))
        lat = None if latency is None else latency[latency["cell"].astype(str).isin(cells)].reset_index(drop=True)
        roots = [folder, os.path.join(folder, study)]
        dirs = _cell_dirs(roots, cells)
        out.append(StudyData(study, part, scores[scores["cell"].isin(cells)].reset_index(drop=True), lat,
                             _plans(dirs), source=tables, cell_dirs=dirs, spec=_spec(roots)))
    return out


def load_studies(results_dir: str) -> list[StudyData]:
    """Studies under ``results_dir``: a study folder (``tables/`` inside) or a folder of them."""
    if not os.path.isdir(results_dir):
        raise ValueError(f"{results_dir}: no such results folder")
    found = _from_tables(results_dir)
    if not found:
        for name in sorted(os.listdir(results_dir)):
            sub = os.path.join(results_dir, name)
            if os.path.isdir(os.path.join(sub, "tables")):
                found += _from_tables(sub)
    if not found:
        raise ValueError(f"{results_dir}: no tidy tables (tables/runs.csv): run `moebench collect {results_dir}` first")
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise ValueError(f"{results_dir}: study names occur in more than one tables folder: {sorted(names)}")
    return sorted(found, key=lambda s: s.name)


def recover_settings(value) -> dict:
    """The recovery settings of a runs row's ``recover`` value (JSON text); ``{}`` for none (empty, NaN, absent)."""
    if not isinstance(value, str) or not value.strip():
        return {}
    settings = json.loads(value)
    return settings if isinstance(settings, dict) else {}


def recover_kind(value) -> str:
    """The recovery kind (``lora``, ``router_kd``, ``full``) of a runs row's ``recover`` value, ``""`` for none."""
    return str(recover_settings(value).get("kind", ""))


def recover_text(value) -> str:
    """``lora on testbed:mix, 100 steps`` (defaults filled in), then any other setting given (``, rank 16``);
    ``""`` for none."""
    settings = recover_settings(value)
    if not settings:
        return ""
    from moebench.method.recover import RecoverSpec

    try:
        text = RecoverSpec.parse(settings).label()
    except (ValueError, TypeError):  # settings this installation does not know: as recorded
        text = f"{settings.get('kind', '?')} on {settings.get('data', '?')}"
    others = sorted(k for k in settings if k not in ("kind", "data", "steps"))
    return text + "".join(f", {k} {settings[k]}" for k in others)


def method_label(method: str, params: str = "{}", skip: str = "none", recover: str = "") -> str:
    """Readable method name: ``unpruned``, ``reap``, ``random(seed=1)``, ``naee+skip:naee``, ``reap+lora`` (a
    recovery stage after the method)."""
    if method == "none":
        return "unpruned"
    values = json.loads(params) if params else {}
    label = method + ("(" + ",".join(f"{k}={values[k]}" for k in sorted(values)) + ")" if values else "")
    label += f"+skip:{skip}" if skip and skip != "none" else ""
    kind = recover_kind(recover)
    return label + (f"+{kind}" if kind else "")


def backend_of(value) -> str:
    """A runs row's ``backend`` (``hf`` for tables from before it was recorded: empty or NaN)."""
    return value if isinstance(value, str) and value else "hf"


def leaf_tasks(scores: pd.DataFrame) -> list[str]:
    """Tasks with sample counts (lm-eval gives none to group aggregates); all tasks if none have any."""
    leaves = scores.loc[scores["n"].notna(), "task"].unique()
    return sorted(leaves if len(leaves) else scores["task"].unique())


def task_metric(scores: pd.DataFrame, task: str, spec: MetricSpec) -> tuple[str, str] | None:
    """(metric, filter) that scores ``task``: the configured one if reported, else ``acc``/``exact_match``."""
    rows = scores[scores["task"] == task]
    metrics = sorted(rows["metric"].unique())
    wanted = [spec.metric_for(task)] + [m for m in FALLBACK_METRICS if task not in spec.task_metrics]
    metric = next((m for m in wanted if m in metrics), None)
    if metric is None:
        return None
    filters = sorted(rows.loc[rows["metric"] == metric, "filter"].unique())
    return metric, spec.filter if spec.filter in filters else filters[0]


def task_values(scores: pd.DataFrame, task: str, metric: str, filt: str, column: str = "value") -> pd.Series:
    """cell -> value (or ``column``, e.g. ``stderr``) of one task's metric."""
    rows = scores[(scores["task"] == task) & (scores["metric"] == metric) & (scores["filter"] == filt)]
    return rows.groupby("cell")[column].first()


def averaged_tasks(scores: pd.DataFrame, spec: MetricSpec) -> list[str]:
    """The tasks in the average: the configured subset, else leaf tasks reporting their metric."""
    if spec.tasks:
        missing = sorted(set(spec.tasks) - set(scores["task"]))
        if missing:
            raise ValueError(f"tasks {missing} are not in the scores table")
        return sorted(spec.tasks)
    have = set(zip(scores["task"], scores["metric"], strict=True))
    return [t for t in leaf_tasks(scores) if (t, spec.metric_for(t)) in have]


def average_accuracy(scores: pd.DataFrame, spec: MetricSpec, tasks: list[str] | None = None) -> pd.Series:
    """cell -> mean over ``tasks`` of the configured metric; NaN where a task is missing."""
    tasks = averaged_tasks(scores, spec) if tasks is None else tasks
    cells = sorted(scores["cell"].unique())
    if not tasks:
        return pd.Series(float("nan"), index=cells, dtype=float)
    columns = {t: task_values(scores, t, spec.metric_for(t), spec.filter) for t in tasks}
    frame = pd.DataFrame(columns).reindex(cells)
    return frame.mean(axis=1, skipna=False)


def average_stderr(scores: pd.DataFrame, spec: MetricSpec, tasks: list[str] | None = None) -> pd.Series:
    """cell -> stderr of the average accuracy: sqrt(sum of squared task stderrs) / tasks; NaN where one is missing."""
    tasks = averaged_tasks(scores, spec) if tasks is None else tasks
    cells = sorted(scores["cell"].unique())
    if not tasks:
        return pd.Series(float("nan"), index=cells, dtype=float)
    columns = {t: task_values(scores, t, spec.metric_for(t), spec.filter, "stderr") for t in tasks}
    frame = pd.DataFrame(columns).reindex(cells)
    return (frame ** 2).sum(axis=1, min_count=len(tasks)).pow(0.5) / len(tasks)


def baselines(runs: pd.DataFrame) -> dict[str, str]:
    """model -> cell id of its unpruned cell (method ``none``, ratio 0, no skipping, no recovery)."""
    base = runs[(runs["method"] == "none") & (runs["ratio"] == 0) & (runs["skip"] == "none")]
    if "recover" in base:
        base = base[base["recover"].map(lambda v: not recover_kind(v)).astype(bool)]  # a mask, also when empty
    base = base.sort_values(["limited", "cell"])
    return {m: group["cell"].iloc[0] for m, group in base.groupby("model", sort=True)}


SUMMARY_COLUMNS = ["model", "method", "calib", "ratio", "accuracy", "accuracy_stderr", "recovery", "weight_bytes",
                   "run_peak_bytes", "load_peak_bytes", "memory_measure", "decode_speedup", "limited", "cell",
                   "method_id", "params", "skip", "recover", "backend", "baseline", "kind", "facet", "apply", "device",
                   "speed_pairing", "under_load", "speed_flag", *SPEED_COLUMNS, *SPEEDUP_COLUMNS[1:]]


def speed_flag(run) -> str:
    """Why a cell's speed ratio is not to be read as a paired measurement on a quiet machine ("" if it is)."""
    pairing = str(getattr(run, "speed_pairing", "") or "")
    if pd.isna(getattr(run, "decode_speedup", float("nan"))):
        return ""
    if pairing not in PAIRED:
        return "unpaired"
    return "under load" if bool(getattr(run, "under_load", False)) else ""


def plan_kind(study: StudyData, cell: str, method: str) -> str:
    """A cell's method kind: its plan's ``kind``, else the registered method's, else ``prune``."""
    kind = (study.plans.get(cell) or {}).get("kind")
    return kind if isinstance(kind, str) and kind else registered_kind(method)


def summary(study: StudyData, spec: MetricSpec) -> pd.DataFrame:
    """The main table: one row per cell with accuracy (and its stderr), recovery, resident weights, run peak,
    the paired decode speedup and its spread and flag, the method's kind and figure facet
    (`moebench.report.facets`), and ``recover``: the kind of the recovery stage after the method (``lora``,
    ``router_kd``, ``full``; ``""`` for none), which the ``method`` label also names (``reap+lora``)."""
    runs = study.runs
    acc, err = average_accuracy(study.scores, spec), average_stderr(study.scores, spec)
    base = baselines(runs)
    backends = {backend_of(v) for v in runs["backend"]} if "backend" in runs else {"hf"}
    rows = []
    for run in runs.itertuples(index=False):
        ref = base.get(run.model)
        accuracy = acc.get(run.cell, float("nan"))
        ref_acc = acc.get(ref, float("nan")) if ref else float("nan")
        weights = run.weight_bytes if not pd.isna(run.weight_bytes) else run.expert_bytes + run.other_bytes
        kind = plan_kind(study, run.cell, run.method)
        recover = getattr(run, "recover", "")
        label = method_label(run.method, run.params, run.skip, recover)
        backend = backend_of(getattr(run, "backend", "hf"))
        if len(backends) > 1 and backend != "hf":  # a study with both backends: its cells told apart
            label += f"@{backend}"
        row = {"model": run.model, "method": label,
               "calib": run.calib, "ratio": float(run.ratio), "accuracy": accuracy,
               "accuracy_stderr": err.get(run.cell, float("nan")),
               "recovery": 100.0 * accuracy / ref_acc if ref_acc else float("nan"),
               "weight_bytes": weights, "run_peak_bytes": run.run_peak_bytes, "load_peak_bytes": run.load_peak_bytes,
               "memory_measure": run.memory_measure, "decode_speedup": run.decode_speedup,
               "limited": bool(run.limited), "cell": run.cell, "method_id": run.method,
               "params": run.params, "skip": run.skip, "recover": recover_kind(recover), "backend": backend,
               "baseline": run.cell == ref,
               "kind": kind,
               "facet": facet_of(run.method, run.skip, kind), "apply": str(getattr(run, "apply", "physical")),
               "device": str(getattr(run, "device", "") or ""), "speed_pairing": run.speed_pairing,
               "under_load": bool(run.under_load), "speed_flag": speed_flag(run)}
        row.update({c: getattr(run, c, float("nan")) for c in (*SPEED_COLUMNS, *SPEEDUP_COLUMNS[1:])})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    frame["order"] = (~frame["baseline"]).astype(int)
    frame = frame.sort_values(["model", "order", "method", "calib", "ratio", "cell"]).drop(columns="order")
    return frame.reset_index(drop=True)


TWIN_KEYS = ("model", "method_id", "params", "skip", "calib", "ratio", "apply")


def unrecovered(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a `summary` without a recovery stage (every row of a table from before recovery)."""
    return table[table["recover"] == ""] if "recover" in table else table


def twins(table: pd.DataFrame) -> dict[str, str | None]:
    """recovered cell -> the cell id of its twin in ``table`` (a `summary`): same `TWIN_KEYS`, no recovery,
    unlimited cells first; None where it has none."""
    if "recover" not in table:
        return {}
    keys = [k for k in TWIN_KEYS if k in table]
    found: dict[tuple, str] = {}
    plain = unrecovered(table)
    order = plain.sort_values(["limited", "cell"]) if "limited" in plain else plain.sort_values("cell")
    for row in order.to_dict("records"):
        found.setdefault(tuple(row[k] for k in keys), row["cell"])
    recovered = table[table["recover"] != ""]
    return {row["cell"]: found.get(tuple(row[k] for k in keys)) for row in recovered.to_dict("records")}


def per_task(study: StudyData, spec: MetricSpec) -> tuple[pd.DataFrame, dict[str, tuple[str, str]]]:
    """cell x leaf-task table of each task's metric, and task -> (metric, filter) used."""
    used = {}
    for task in leaf_tasks(study.scores):
        choice = task_metric(study.scores, task, spec)
        if choice:
            used[task] = choice
    frame = pd.DataFrame({t: task_values(study.scores, t, *mf) for t, mf in used.items()})
    return frame.reindex(sorted(study.runs["cell"])), used
