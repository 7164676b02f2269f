"""Tidy tables derived from finished cell folders (never edited in place).

``runs``: one row per finished cell (spec, measurements, environment).
``scores``: one row per cell x task x metric x filter (value, stderr, n).
``latency``: one row per cell x prompt length x batch (per-token decode latency, see
`moebench.measure.decode_latency`), for cells that measured it.
All are written as CSV and Parquet under ``<results dir>/tables/``. Cells run with an lm-eval
``limit`` are flagged (``limited``) and kept out of leaderboards; tables mixing lm-eval or task
versions are refused unless asked for, then flagged.

``DONE`` means complete: `verify_cell` checks every finished cell's files (JSON that parses, the
fields the tables read, their value types) before a row is made. Broken cells are refused by
name and path (`BrokenCellsError`) or, when asked, left out.
"""

from __future__ import annotations

import glob
import json
import math
import os
import warnings
from typing import TYPE_CHECKING

from moebench.limits import plan_problem
from moebench.util import atomic_write

if TYPE_CHECKING:  # pandas is imported where tables are built: checking a cell (grid status) needs none
    import pandas as pd

SPEEDUPS = [f"{prefix}{stage}_speedup{q}" for prefix in ("", "default_kernel_", "skip_")
            for stage in ("prefill", "decode") for q in ("", "_lo", "_hi")]
RUN_COLUMNS = ["cell", "study", "model", "method", "params", "skip", "ratio", "calib", "apply", "recover", "backend",
               "tasks",
               "limit", "limited", "experts_kept", "parameters",
               # memory (moebench.measure.memory)
               "expert_bytes", "other_bytes", "weight_bytes", "host_expert_bytes",
               "offload_device_expert_bytes_peak", "weight_bytes_by_device",
               "load_peak_bytes", "run_peak_bytes", "memory_measure",
               # speed: the variant's rates, the reference's, the paired ratios (moebench.measure.reference)
               "prefill_tokens_per_s", "prefill_tokens_per_s_p90", "prefill_tokens_per_s_p10",
               "prefill_tokens_per_s_min", "prefill_tokens_per_s_max", "decode_tokens_per_s",
               "decode_tokens_per_s_p90", "decode_tokens_per_s_p10", "decode_tokens_per_s_min",
               "decode_tokens_per_s_max", "ref_prefill_tokens_per_s", "ref_decode_tokens_per_s", *SPEEDUPS,
               "speed_pairing", "speed_pairing_note", "speed_kernel", "ref_kernel_default",
               # how busy the machine was while timing (moebench.measure.load)
               "load_before", "load_after", "cpu_cores", "threads", "others_cpu", "under_load",
               "calibration_s", "planning_s", "eval_s", "skip_rate",
               # the evaluation loop: requests sent to the model (one per choice / generation) and their rate;
               # backend vllm: the engine's start-up, the checkpoint's bytes on disk, vLLM's version
               "eval_requests", "eval_requests_per_s", "vllm_startup_s", "checkpoint_bytes", "vllm_version",
               # the recovery stage (moebench.method.recover): training seconds, mean loss of its first / last tenth
               "recover_s", "recover_loss_first", "recover_loss_last",
               "lm_eval_version", "moebench_version", "torch_version", "transformers_version", "git_sha",
               "device", "dtype", "expert_kernel", "seed", "task_versions"]


# cell.json metrics that the runs table holds as numbers (the others are text, flags or JSON)
NUMERIC_METRICS = frozenset({
    "parameters", "expert_bytes", "other_bytes", "weight_bytes", "host_expert_bytes",
    "offload_device_expert_bytes_peak", "load_peak_bytes", "run_peak_bytes",
    *[c for c in RUN_COLUMNS if "tokens_per_s" in c], *SPEEDUPS,
    "load_before", "load_after", "cpu_cores", "threads", "others_cpu", "planning_s", "eval_s", "skip_rate",
    "eval_requests", "eval_requests_per_s", "vllm_startup_s", "checkpoint_bytes",
    "recover_s", "recover_loss_first", "recover_loss_last"})
PLAUSIBLE = 1e18  # no recorded number is larger in magnitude (bytes of an exabyte; anything beyond is damage)


def _numbers(value, path: str):
    """Every number inside ``value`` (dicts and lists walked) as ``(path, number)``."""
    if isinstance(value, bool):
        return
    if isinstance(value, NUMBER):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def number_problem(where: str, value) -> str | None:
    """Why a recorded number cannot be used (NaN, inf, beyond `PLAUSIBLE`), or None."""
    for path, number in _numbers(value, ""):
        if not math.isfinite(number) or abs(number) > PLAUSIBLE:
            return f"{where}{'.' + path if path else ''}={number!r} is not a finite number of plausible size"
    return None


def _metrics_problem(metrics: dict) -> str | None:
    for name in sorted(NUMERIC_METRICS & set(metrics)):
        value = metrics[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, NUMBER)):
            return f"cell.json metrics: {name}={str(value)[:40]!r} is a {type(value).__name__}, not a number"
    return number_problem("cell.json metrics", metrics)


class BrokenCellsError(ValueError):
    """Finished cells whose files are broken; ``cells`` maps each folder to what is wrong."""

    def __init__(self, cells: dict[str, str]):
        self.cells = cells
        lines = [f"{folder}: {problem}" for folder, problem in sorted(cells.items())]
        super().__init__(f"{len(cells)} finished cell(s) hold broken results:\n  " + "\n  ".join(lines) +
                         "\nTo fix: `moebench grid run SPEC` runs them again, or `moebench collect --skip-broken` "
                         "writes the tables without them")


def finished_cells(results_dir: str) -> list[str]:
    """Cell folders under ``results_dir`` (one study or many) that hold a DONE marker, sorted."""
    pattern = os.path.join(results_dir, "**", "cells", "*", "DONE")
    return sorted(folder for folder in {os.path.dirname(p) for p in glob.glob(pattern, recursive=True)}
                  if _inside(results_dir, folder))


def _inside(results_dir: str, folder: str) -> bool:
    """Whether a cell folder lies in ``results_dir`` itself: reached through no symbolic link below it (a linked
    cell or study folder, planted or not, is left out with a warning: collecting reopens and writes cells)."""
    relative = os.path.relpath(folder, results_dir)
    path = results_dir
    for part in relative.split(os.sep):
        path = os.path.join(path, part)
        if os.path.islink(path):
            warnings.warn(f"{path} is a symbolic link (to {os.readlink(path)}); its cells are left out: moebench "
                          "reads and writes cells only inside the results folder", stacklevel=3)
            return False
    return True


NUMBER = (int, float)
# field -> accepted types, of cell.json, its "spec", and results.json (None: JSON null)
CELL_FIELDS = {"id": str, "spec": dict, "metrics": dict, "env": dict}
SPEC_FIELDS = {"model": str, "method": str, "params": dict, "skip": str, "ratio": NUMBER, "calib": (str, None),
               "apply": str, "tasks": list, "lm_eval": dict, "seed": int}
RESULT_FIELDS = {"results": dict, "versions": dict}


def _type_problem(where: str, data: dict, fields: dict) -> str | None:
    if not isinstance(data, dict):
        return f"{where} holds a {type(data).__name__}, not a mapping"
    for name, types in fields.items():
        types = types if isinstance(types, tuple) else (types,)
        value = data.get(name, KeyError)
        if value is KeyError:
            return f"{where} has no {name!r}"
        ok = (value is None and None in types) or any(
            isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in types if t is not None)
        if not ok:
            return f"{where}: {name}={str(value)[:60]!r} is a {type(value).__name__}, not {_names(types)}"
    return None


def _names(types: tuple) -> str:
    return " or ".join("null" if t is None else t.__name__ for t in types)


def _load_json(folder: str, name: str) -> tuple[object, str | None]:
    try:
        return _read(folder, name), None
    except FileNotFoundError:
        return None, f"{name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{name} is not readable JSON ({err})"


def verify_cell(folder: str) -> str | None:
    """What is wrong with a finished cell's files, or None when its rows can be made.

    Checks that results.json, cell.json (and plan.json for pruned cells) parse, hold the fields the
    tables read with the right value types, and that cell.json belongs to this folder.
    """
    cell, problem = _load_json(folder, "cell.json")
    problem = problem or _type_problem("cell.json", cell, CELL_FIELDS)
    problem = problem or _type_problem("cell.json spec", cell["spec"], SPEC_FIELDS)
    if problem is None and cell["id"] != os.path.basename(os.path.normpath(folder)):
        problem = f"cell.json belongs to cell {cell['id']!r}, not to this folder"
    if problem is None and not all(isinstance(t, str) for t in cell["spec"]["tasks"]):
        problem = "cell.json spec: tasks must be names"
    if problem is None:
        problem = _metrics_problem(cell["metrics"])
    results, bad = _load_json(folder, "results.json")
    problem = problem or bad or _type_problem("results.json", results, RESULT_FIELDS)
    if problem is None:
        problem = _results_problem(results)
    if problem is None and cell["spec"]["method"] != "none":
        plan, bad = _load_json(folder, "plan.json")
        problem = bad or (f"plan.json: {why}" if (why := plan_problem(plan)) else None)
    return problem


def _results_problem(results: dict) -> str | None:
    for task, values in results["results"].items():
        if not isinstance(values, dict):
            return f"results.json: results[{task!r}] is a {type(values).__name__}, not a mapping of metrics"
        for key, value in values.items():
            number = isinstance(value, NUMBER) and not isinstance(value, bool)
            if "," in key and not (number or value in ("N/A", None)):
                return f"results.json: results[{task!r}][{key!r}]={str(value)[:40]!r} is not a number"
            if "," in key and number and (why := number_problem(f"results.json: results[{task!r}][{key!r}]", value)):
                return why
    for task, version in results["versions"].items():
        if isinstance(version, bool) or not isinstance(version, (int, float, str)):
            return f"results.json: versions[{task!r}]={str(version)[:40]!r} is not a version number"
    return None


def complete_cells(results_dir: str, skip_broken: bool = False) -> list[str]:
    """The finished cells under ``results_dir`` whose files verify; broken ones raise `BrokenCellsError`
    unless ``skip_broken`` (then they are left out)."""
    folders = finished_cells(results_dir)
    broken = {f: p for f in folders if (p := verify_cell(f)) is not None}
    if broken and not skip_broken:
        raise BrokenCellsError(broken)
    return [f for f in folders if f not in broken]


def _read(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def run_row(folder: str) -> dict:
    """The ``runs`` row of one finished cell."""
    cell, results = _read(folder, "cell.json"), _read(folder, "results.json")
    spec, metrics, env = cell["spec"], cell.get("metrics", {}), cell.get("env", {})
    limit = spec["lm_eval"].get("limit")
    row = {
        "cell": cell["id"], "study": cell.get("study"), "model": spec["model"], "method": spec["method"],
        "params": json.dumps(spec["params"], sort_keys=True), "skip": spec["skip"], "ratio": spec["ratio"],
        "calib": spec["calib"] or "", "apply": spec["apply"], "tasks": ",".join(spec["tasks"]),
        "recover": json.dumps(spec["recover"], sort_keys=True) if spec.get("recover") else "",
        "backend": spec.get("backend") or "hf", "limit": limit, "limited": limit is not None, "seed": spec["seed"],
        "task_versions": json.dumps(results.get("versions", {}), sort_keys=True),
    }
    row.update({k: metrics.get(k) for k in RUN_COLUMNS if k in metrics})
    row.update({k: env.get(k) for k in RUN_COLUMNS if k in env})
    calibration = os.path.join(os.path.dirname(os.path.dirname(folder)), "calibration.json")
    if spec["calib"] and os.path.exists(calibration):
        row["calibration_s"] = _read(os.path.dirname(calibration), "calibration.json").get(
            f"{spec['model']}|{spec['calib']}")
    return {k: row.get(k) for k in RUN_COLUMNS}


def score_rows(folder: str) -> list[dict]:
    """The ``scores`` rows of one finished cell: every metric of every task and group."""
    cell, results = _read(folder, "cell.json"), _read(folder, "results.json")
    rows = []
    samples = results.get("n-samples", {})
    for task, values in sorted(results.get("results", {}).items()):
        n = samples.get(task, {}).get("effective")
        for key, value in sorted(values.items()):
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({"cell": cell["id"], "task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n})
    return rows


LATENCY_COLUMNS = ["cell", "prompt_len", "batch", "new_tokens", "ms_per_token", "ms_per_token_p90", "prefill_ms",
                   "ms_per_token_p10"]


def latency_rows(folder: str) -> list[dict]:
    """The ``latency`` rows of one finished cell (none when the cell did not measure latency)."""
    cell = _read(folder, "cell.json")
    return [{"cell": cell["id"], **{k: row.get(k) for k in LATENCY_COLUMNS[1:]}}
            for row in cell.get("metrics", {}).get("latency") or []]


def build_latency(results_dir: str, folders: list[str] | None = None) -> pd.DataFrame:
    """The ``latency`` table of the finished cells under ``results_dir`` (or of ``folders``)."""
    import pandas as pd

    rows = [r for f in (complete_cells(results_dir) if folders is None else folders) for r in latency_rows(f)]
    frame = pd.DataFrame(rows, columns=LATENCY_COLUMNS)
    return frame.sort_values(["cell", "batch", "prompt_len"]).reset_index(drop=True)


def build_tables(results_dir: str, allow_mixed: bool = False, skip_broken: bool = False,
                 folders: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, scores)`` from the finished cells under ``results_dir`` (or from ``folders``, verified).

    Broken cells raise `BrokenCellsError` naming them, unless ``skip_broken``.
    """
    import pandas as pd

    folders = complete_cells(results_dir, skip_broken) if folders is None else folders
    runs = pd.DataFrame([run_row(f) for f in folders], columns=RUN_COLUMNS)
    scores = pd.DataFrame([r for f in folders for r in score_rows(f)],
                          columns=["cell", "task", "metric", "filter", "value", "stderr", "n"])
    mixed = [col for col in ("lm_eval_version", "task_versions") if runs[col].nunique(dropna=True) > 1]
    if mixed and not allow_mixed:
        raise ValueError(f"{results_dir}: cells differ in {', '.join(mixed)}; their scores are not comparable. "
                         "Re-run the old cells, or pass --allow-mixed to write the tables with a 'mixed_versions' flag")
    runs["mixed_versions"] = bool(mixed)
    runs = (runs.sort_values(["study", "model", "method", "params", "skip", "calib", "ratio", "cell"])
            .reset_index(drop=True))
    scores = scores.sort_values(["cell", "task", "metric", "filter"]).reset_index(drop=True)
    return runs, scores


def write_tables(results_dir: str, allow_mixed: bool = False, skip_broken: bool = False) -> dict[str, str]:
    """Write runs, scores and (when measured) latency as CSV and Parquet under ``<results_dir>/tables``;
    returns the paths. Broken cells raise `BrokenCellsError` unless ``skip_broken``."""
    folders = complete_cells(results_dir, skip_broken)
    runs, scores = build_tables(results_dir, allow_mixed, folders=folders)
    latency = build_latency(results_dir, folders)
    out = os.path.join(results_dir, "tables")
    os.makedirs(out, exist_ok=True)
    paths = {}
    frames = [("runs", runs), ("scores", scores)]
    if latency.empty:  # a table from an earlier collect would describe cells no longer measured
        for ext in ("csv", "parquet"):
            if os.path.exists(os.path.join(out, f"latency.{ext}")):
                os.remove(os.path.join(out, f"latency.{ext}"))
    else:
        frames.append(("latency", latency))
    for name, frame in frames:
        for ext in ("csv", "parquet"):
            path = os.path.join(out, f"{name}.{ext}")
            atomic_write(path, lambda tmp, f=frame, e=ext: f.to_csv(tmp, index=False) if e == "csv"
                         else f.to_parquet(tmp, index=False), root=results_dir)
            paths[f"{name}.{ext}"] = path
    return paths
