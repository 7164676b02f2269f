"""Tidy tables derived from finished cell folders (never edited in place).

``runs``: one row per finished cell (spec, measurements, environment).
``scores``: one row per cell x task x metric x filter (value, stderr, n).
``latency``: one row per cell x prompt length x batch (per-token decode latency, see
`moebench.measure.decode_latency`), for cells that measured it.
All are written as CSV and Parquet under ``<results dir>/tables/``. Cells run with an lm-eval
``limit`` are flagged (``limited``) and kept out of leaderboards; tables mixing lm-eval or task
versions are refused unless asked for, then flagged.
"""

from __future__ import annotations

import glob
import json
import os

import pandas as pd

from moebench.util import atomic_write

RUN_COLUMNS = ["cell", "study", "model", "method", "params", "skip", "ratio", "calib", "apply", "tasks",
               "limit", "limited", "experts_kept", "parameters", "expert_bytes", "other_bytes",
               "peak_memory_bytes", "prefill_tokens_per_s", "prefill_tokens_per_s_p90", "decode_tokens_per_s",
               "decode_tokens_per_s_p90", "prefill_tokens_per_s_p10", "prefill_tokens_per_s_min",
               "prefill_tokens_per_s_max", "decode_tokens_per_s_p10", "decode_tokens_per_s_min",
               "decode_tokens_per_s_max", "calibration_s", "planning_s", "eval_s", "skip_rate",
               "lm_eval_version", "moebench_version", "torch_version", "transformers_version", "git_sha",
               "device", "dtype", "expert_kernel", "seed", "task_versions"]


def finished_cells(results_dir: str) -> list[str]:
    """Cell folders under ``results_dir`` (one study or many) that hold a DONE marker, sorted."""
    pattern = os.path.join(results_dir, "**", "cells", "*", "DONE")
    return sorted(os.path.dirname(p) for p in glob.glob(pattern, recursive=True))


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
        "limit": limit, "limited": limit is not None, "seed": spec["seed"],
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


def build_latency(results_dir: str) -> pd.DataFrame:
    """The ``latency`` table of the finished cells under ``results_dir``."""
    rows = [r for f in finished_cells(results_dir) for r in latency_rows(f)]
    frame = pd.DataFrame(rows, columns=LATENCY_COLUMNS)
    return frame.sort_values(["cell", "batch", "prompt_len"]).reset_index(drop=True)


def build_tables(results_dir: str, allow_mixed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, scores)`` from the finished cells under ``results_dir``."""
    folders = finished_cells(results_dir)
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


def write_tables(results_dir: str, allow_mixed: bool = False) -> dict[str, str]:
    """Write runs, scores and (when measured) latency as CSV and Parquet under ``<results_dir>/tables``;
    returns the paths."""
    runs, scores = build_tables(results_dir, allow_mixed)
    latency = build_latency(results_dir)
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
                         else f.to_parquet(tmp, index=False))
            paths[f"{name}.{ext}"] = path
    return paths
