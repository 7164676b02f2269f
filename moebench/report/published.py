"""Published numbers as data (``papers/*.yaml``), and measured-beside-published comparisons.

A file holds one paper: ``paper``, ``short``, ``venue``, ``year``, ``source`` (arXiv id / DOI),
``defaults`` merged into each of its ``entries``. An entry's fields (`ENTRY_FIELDS`): ``table``,
``model`` (hub id), ``method`` (moebench's name, e.g. ``reap``, ``hc_smoe``; ``none`` = unpruned;
names moebench lacks stay references), ``params``, ``skip``, ``ratio`` or ``experts_kept`` with
``experts_total`` (ratio = 1 - kept / total), ``calibration`` (moebench source name; null = none or
not stated), ``quantity`` (`QUANTITIES`), ``metric`` / ``task_metrics`` / ``filter`` / ``tasks``
(the average's definition; ``tasks: []`` when the paper's set is not restated), ``num_fewshot``,
``value`` as printed, ``scale`` (100 when printed in percent, 1 for fractions or raw units), ``notes``.

Matching rule: a study cell matches an entry when the model is the same (exact hub id, or the same
last path component, case-insensitive), method and skip rule are equal, the ratio is equal within
1e-6, the entry's params agree with those the cell sets, and the calibration is equal where both
have one (unpruned and data-free cells have none). The measured number is computed the entry's way:
its metric on its tasks (which the study must have evaluated), decode speedup over the unpruned
cell (the cell's paired ratio), or peak memory in MiB (the cell's measured run peak).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import pandas as pd

from moebench.report.tables import MetricSpec, StudyData, average_accuracy
from moebench.util import read_yaml

QUANTITIES = ("average", "decode_speedup", "peak_memory_mib")
PAPER_FIELDS = {"paper", "short", "venue", "year", "source", "defaults", "entries"}
ENTRY_FIELDS = {"table", "model", "method", "params", "skip", "ratio", "experts_kept", "experts_total", "calibration",
                "quantity", "metric", "task_metrics", "filter", "tasks", "num_fewshot", "value", "scale", "notes"}
COLUMNS = ["paper", "table", "model", "method", "ratio", "calib", "quantity", "published", "measured", "difference",
           "cell", "caveat"]


@dataclass(frozen=True)
class Published:
    """One published number and the setting it was measured in."""

    paper: str
    short: str
    venue: str
    year: int
    source: str
    table: str
    model: str
    method: str
    ratio: float
    value: float
    quantity: str = "average"
    params: dict = field(default_factory=dict)
    skip: str = "none"
    experts_kept: int | None = None
    calibration: str | None = None
    metric: str = "acc"
    task_metrics: dict = field(default_factory=dict)
    filter: str = "none"
    tasks: tuple = ()
    num_fewshot: int = 0
    scale: float = 1.0
    notes: str = ""


def published_dir() -> str:
    """The folder of the shipped YAML files."""
    return os.path.join(os.path.dirname(__file__), "papers")


def _entry(paper: dict, raw: dict, where: str) -> Published:
    item = {**(paper.get("defaults") or {}), **raw}
    unknown = sorted(set(item) - ENTRY_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(ENTRY_FIELDS)}")
    total = item.pop("experts_total", None)
    if "ratio" not in item:
        if item.get("experts_kept") is None or not total:
            raise ValueError(f"{where}: give ratio, or experts_kept with experts_total")
        item["ratio"] = 1.0 - item["experts_kept"] / total
    if item.get("quantity", "average") not in QUANTITIES:
        raise ValueError(f"{where}: quantity {item['quantity']!r} is not one of {QUANTITIES}")
    item["tasks"] = tuple(item.get("tasks") or ())
    item["ratio"], item["value"] = round(float(item["ratio"]), 6), float(item["value"])
    return Published(paper=" ".join(str(paper["paper"]).split()), short=paper["short"], venue=paper["venue"],
                     year=int(paper["year"]), source=paper["source"], **item)


def load_published(folder: str | None = None) -> list[Published]:
    """Every entry of every ``*.yaml`` in ``folder`` (default: the shipped data), in file order."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder or published_dir(), "*.yaml"))):
        paper = read_yaml(path)
        if not isinstance(paper, dict) or not isinstance(paper.get("entries"), list):
            raise ValueError(f"{path}: not a published-numbers file (a mapping with a list of entries)")
        unknown = sorted(set(paper) - PAPER_FIELDS)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}")
        out += [_entry(paper, raw, f"{os.path.basename(path)} entry {i}") for i, raw in enumerate(paper["entries"])]
    return out


def same_model(a: str, b: str) -> bool:
    """Equal hub ids, or equal last path components (a local copy of a hub model), ignoring case."""
    a, b = a.rstrip("/").lower(), b.rstrip("/").lower()
    return a == b or a.split("/")[-1] == b.split("/")[-1]


def matches(entry: Published, row) -> bool:
    """Whether a main-table row (see `tables.summary`) measures the entry's setting."""
    if row.get("recover"):  # trained after the method: not the one-shot setting papers report
        return False
    params = json.loads(row["params"] or "{}")
    calib_ok = entry.calibration is None or not row["calib"] or entry.calibration.lower() == row["calib"].lower()
    return (same_model(entry.model, row["model"]) and entry.method == row["method_id"] and entry.skip == row["skip"]
            and abs(entry.ratio - row["ratio"]) < 1e-6 and calib_ok
            and all(params.get(k, v) == v for k, v in entry.params.items()))


def _measured(entry: Published, row, study: StudyData) -> tuple[float | None, str]:
    if entry.quantity == "decode_speedup":  # the paper's stock model: the reference in its default kernel, if measured
        stock = row.get("default_kernel_decode_speedup")
        if stock is not None and not pd.isna(stock):
            return stock, "against the unpruned model in transformers' default experts kernel (the paper's stock model)"
        return row["decode_speedup"], ""
    if entry.quantity == "peak_memory_mib":  # the paper's peak GPU memory: the measured run peak
        caveat = "" if str(row["memory_measure"]).startswith("cuda") else \
            "measured on a CPU: the cell process's peak resident set, runtime included"
        return row["run_peak_bytes"] / 2 ** 20, caveat
    if not entry.tasks:
        return row["accuracy"] * entry.scale, "the paper's task set is not restated: measured on the study's tasks"
    if not set(entry.tasks) <= set(study.scores["task"]):
        return None, ""
    spec = MetricSpec(entry.metric, entry.filter, dict(entry.task_metrics), entry.tasks)
    value = average_accuracy(study.scores, spec, list(entry.tasks)).get(row["cell"])
    return (None if value is None else value * entry.scale), ""


def compare(study: StudyData, table: pd.DataFrame, entries: list[Published] | None = None) -> pd.DataFrame:
    """Measured beside published for every (entry, cell) pair that matches."""
    entries = load_published() if entries is None else entries
    rows = []
    for entry in entries:
        for _, row in table.iterrows():
            if not matches(entry, row):
                continue
            measured, caveat = _measured(entry, row, study)
            if measured is None or pd.isna(measured):
                continue
            caveat = "; ".join(c for c in (caveat, "limited run" if row["limited"] else "") if c)
            rows.append({"paper": f"{entry.short}", "table": entry.table, "model": row["model"],
                         "method": row["method"], "ratio": row["ratio"], "calib": row["calib"],
                         "quantity": entry.quantity, "published": entry.value, "measured": float(measured),
                         "difference": float(measured) - entry.value, "cell": row["cell"], "caveat": caveat})
    return pd.DataFrame(rows, columns=COLUMNS)


def references(models, entries: list[Published] | None = None) -> list[Published]:
    """Published entries about any of ``models``."""
    entries = load_published() if entries is None else entries
    return [e for e in entries if any(same_model(e.model, m) for m in models)]
