"""Small studies in the real on-disk schema for report tests: tidy tables, plans and per-item files.

`write_study` writes ``<root>/<study>/tables/{runs,scores}.csv`` (columns of `moebench.grid.results`),
``cells/<id>/plan.json`` for pruned cells and, where a cell gives per-item correctness,
``cells/<id>/items.csv.gz`` through the grid's own writer (from lm-eval-shaped samples).
"""

from __future__ import annotations

import json
import os

import pandas as pd

from moebench.grid.items import write_items
from moebench.grid.results import RUN_COLUMNS

TASKS = ("t_alpha", "t_beta")


def cell(cid: str, method: str, ratio: float, acc: float, calib: str = "testbed:mix", **kw) -> dict:
    """A cell description: ``acc`` is every task's accuracy unless ``items`` (task -> 0/1 list) is given."""
    return {"cell": cid, "method": method, "ratio": ratio, "acc": acc, "calib": calib, **kw}


def _samples(items: dict[str, list[int]]) -> dict:
    return {task: [{"doc_id": i, "doc_hash": f"{task}-{i:04d}".encode().hex(), "filter": "none", "metrics": ["acc"],
                    "acc": float(v)} for i, v in enumerate(values)] for task, values in items.items()}


def _run_row(c: dict, study: str) -> dict:
    """One ``runs`` row. ``speed``: (median, p90, p10) decode tokens/s; ``speedup`` / ``skip_speedup``: the
    paired ratio (median, lo, hi); ``pairing`` and ``under_load`` as a cell records them; ``recover``: the
    recovery settings (``{"kind": "lora", "data": "testbed:mix"}``), written as the runs table's JSON."""
    row = dict.fromkeys(RUN_COLUMNS)
    speed = c.get("speed", (100.0, 95.0, 105.0))  # median, p90 (slow end), p10 (fast end) tokens/s
    baseline = c["method"] == "none" and c.get("skip", "none") == "none"
    speedup = c.get("speedup", (1.0, 1.0, 1.0) if baseline else (speed[0] / 100.0, speed[1] / 100.0, speed[2] / 100.0))
    row.update(decode_speedup=speedup[0], decode_speedup_lo=speedup[1], decode_speedup_hi=speedup[2],
               speed_pairing=c.get("pairing", "self" if baseline else "interleaved"),
               under_load=c.get("under_load", False))
    if "skip_speedup" in c:
        row.update(zip(("skip_decode_speedup", "skip_decode_speedup_lo", "skip_decode_speedup_hi"), c["skip_speedup"],
                       strict=True))
    resident = c.get("kind") == "select" or c.get("apply") == "mask"  # nothing freed
    if c.get("recover"):  # a recovery stage after the method: its settings as the grid records them
        row.update(recover=json.dumps(c["recover"], sort_keys=True), recover_s=12.5, recover_loss_first=3.2,
                   recover_loss_last=2.4)
    row.update(cell=c["cell"], study=study, model=c.get("model", "testbed-8e"), method=c["method"],
               params=json.dumps(c.get("params", {}), sort_keys=True), skip=c.get("skip", "none"), ratio=c["ratio"],
               calib="" if c["method"] in ("none", "random", "weight_norm") else c["calib"],
               apply=c.get("apply", "physical"), tasks="t", limit=None, limited=False,
               expert_bytes=int(8_000_000 * (1 if resident else 1 - c["ratio"])),
               other_bytes=1_000_000, run_peak_bytes=20_000_000, memory_measure="host_rss (VmHWM)",
               decode_tokens_per_s=speed[0],
               decode_tokens_per_s_p90=speed[1], lm_eval_version="0.4.13", task_versions="{}", seed=0,
               device="cpu", dtype="float32", expert_kernel="moebench")
    if len(speed) > 2 and speed[2] is not None:
        row.update(decode_tokens_per_s_p10=speed[2], decode_tokens_per_s_min=speed[1], decode_tokens_per_s_max=speed[2])
    return row


def write_study(root: str, cells: list[dict], study: str = "unc", spread: bool = True) -> str:
    """Write the study folder and return it (``spread=False``: runs table without the p10/min/max columns)."""
    folder = os.path.join(root, study)
    runs, scores = [], []
    for c in cells:
        runs.append(_run_row(c, study))
        items = c.get("items")
        for task in TASKS:
            values = items[task] if items else None
            value = sum(values) / len(values) if values else c["acc"]
            n = len(values) if values else 150
            scores.append({"cell": c["cell"], "task": task, "metric": "acc", "filter": "none", "value": value,
                           "stderr": (value * (1 - value) / (n - 1)) ** 0.5, "n": n})
        cell_dir = os.path.join(folder, "cells", c["cell"])
        os.makedirs(cell_dir, exist_ok=True)
        if c["method"] != "none":
            kept = max(2, round(8 * (1 - c["ratio"])))
            plan = {"method": c["method"], "kind": c.get("kind", "prune"), "params": c.get("params", {}),
                    "ratio": c["ratio"], "calib": c["calib"], "keep": {str(k): list(range(kept)) for k in range(4)},
                    "extra": {"n_experts": 8}}
            with open(os.path.join(cell_dir, "plan.json"), "w") as f:
                json.dump(plan, f)
        if items:
            write_items(cell_dir, _samples(items))
    tables = os.path.join(folder, "tables")
    os.makedirs(tables, exist_ok=True)
    frame = pd.DataFrame(runs, columns=RUN_COLUMNS).assign(mixed_versions=False)
    if not spread:
        frame = frame.drop(columns=[c for c in frame.columns if c.endswith(("_p10", "_min", "_max"))])
    frame.to_csv(os.path.join(tables, "runs.csv"), index=False)
    pd.DataFrame(scores).to_csv(os.path.join(tables, "scores.csv"), index=False)
    return folder


LORA = {"kind": "lora", "data": "testbed:mix"}  # steps left out: the default (100), as the grid records it


def correct(k: int, n: int = 100) -> dict[str, list[int]]:
    """Per-item results with the first ``k`` of ``n`` items right in every task (nested: k < k' is a subset)."""
    return {task: [1] * k + [0] * (n - k) for task in TASKS}


def recovered_study(root: str, study: str = "rec", rich: bool = False) -> str:
    """The unpruned model (90 of 100 items right per task), reap (40) and frequency (60) at 50% beside their
    LoRA-recovered twins (70, 61), a recovered ean without a twin and reap at 25% without recovery. ``rich``:
    also soft_activation, router_kd after reap, a recovered random seed and every method at 25% recovered."""
    cells = [cell("base", "none", 0.0, 0, items=correct(90)),
             cell("reap50", "reap", 0.5, 0, items=correct(40)),
             cell("reap50l", "reap", 0.5, 0, items=correct(70), recover=LORA),
             cell("freq50", "frequency", 0.5, 0, items=correct(60)),
             cell("freq50l", "frequency", 0.5, 0, items=correct(61), recover=LORA),
             cell("ean50l", "ean", 0.5, 0, items=correct(50), recover=LORA),
             cell("reap25", "reap", 0.25, 0, items=correct(80))]
    if rich:
        kd = {"kind": "router_kd", "data": "testbed:arithmetic", "steps": 200}
        cells += [cell("reap25l", "reap", 0.25, 0, items=correct(85), recover=LORA),
                  cell("freq25", "frequency", 0.25, 0, items=correct(75)),
                  cell("freq25l", "frequency", 0.25, 0, items=correct(78), recover=LORA),
                  cell("soft25", "soft_activation", 0.25, 0, items=correct(77)),
                  cell("soft25l", "soft_activation", 0.25, 0, items=correct(80), recover=LORA),
                  cell("soft50", "soft_activation", 0.5, 0, items=correct(55)),
                  cell("soft50l", "soft_activation", 0.5, 0, items=correct(66), recover=LORA),
                  cell("reap50k", "reap", 0.5, 0, items=correct(52), recover=kd),
                  cell("rand50", "random", 0.5, 0, items=correct(20), params={"seed": 0}),
                  cell("rand50l", "random", 0.5, 0, items=correct(35), params={"seed": 0}, recover=LORA)]
    return write_study(root, cells, study=study)
