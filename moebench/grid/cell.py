"""One grid cell in its own process: ``python -m moebench.grid.cell CELL_DIR``.

Reads ``spec.json``, evaluates the variant through the ``pruned_moe`` lm-eval model, measures it,
and writes ``results.json`` (raw lm-eval results), ``items.csv.gz`` (per-item metric values, see
`moebench.grid.items`), ``plan.json``, ``cell.json`` (spec, metrics, environment), each atomically,
then ``DONE`` last. A failure writes ``failure.json`` with the traceback and exits 1; the next grid
run retries the cell from scratch.

The cell's lock (`moebench.grid.guard`) is taken before anything in the folder is touched and held
until the process ends; a cell locked by another process is left alone (exit status 75). Started
by an executor, the process ends when the executor does.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import time
import traceback

from moebench.grid.items import write_items
from moebench.grid.spec import Cell
from moebench.util import atomic_write_json, atomic_write_text

SPREAD = ("tokens_per_s_p10", "tokens_per_s_min", "tokens_per_s_max")


def _write(folder: str, name: str, data) -> None:
    atomic_write_json(os.path.join(folder, name), data)


def portable(data, prefixes: list[tuple[str, str]] | None = None):
    """``data`` with the paths of this installation (moebench's tasks and package folders) written as
    ``<moebench.tasks>`` and ``<moebench>``, so results do not depend on where moebench is installed."""
    if prefixes is None:
        import moebench
        from moebench.tasks import task_dir

        folders = [(task_dir(), "<moebench.tasks>"), (os.path.dirname(moebench.__file__), "<moebench>")]
        prefixes = list(dict.fromkeys((norm(path), name) for path, name in folders
                                      for norm in (os.path.realpath, os.path.abspath)))
    if isinstance(data, dict):
        return {k: portable(v, prefixes) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [portable(v, prefixes) for v in data]
    if isinstance(data, str):
        for prefix, name in prefixes:
            if data == prefix or data.startswith(prefix + os.sep):
                return name + data[len(prefix):]
    return data


def environment(model) -> dict:
    """Versions, git sha, device, dtype and expert kernel of this run."""
    import lm_eval
    import torch
    import transformers

    import moebench

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(moebench.__file__),
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        sha = None
    param = next(model.parameters())
    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "lm_eval_version": lm_eval.__version__, "moebench_version": moebench.__version__, "git_sha": sha,
            "device": str(param.device), "dtype": str(param.dtype).replace("torch.", ""),
            "expert_kernel": getattr(model.config, "_experts_implementation", None),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else None}


def evaluate(folder: str) -> None:
    """Run the cell in ``folder`` and write its result files (DONE last)."""
    import lm_eval

    from moebench.eval.model import PrunedMoELM
    from moebench.measure.speed import (
        decode_latency,
        decode_speed,
        max_positions,
        peak_memory,
        prefill_speed,
        reset_peak_memory,
        weight_bytes,
    )
    from moebench.moe.checkpoint import default_device
    from moebench.tasks import task_manager

    with open(os.path.join(folder, "spec.json")) as f:
        meta = json.load(f)
    cell = Cell.from_dict(meta["spec"])
    lm = PrunedMoELM(**cell.model_args(meta.get("stats_dir"), meta.get("device") or default_device()))
    reset_peak_memory(lm.device)
    start = time.perf_counter()
    passed = {k: v for k, v in cell.lm_eval.items() if k != "batch_size"}  # batch_size is the model's
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(cell.tasks), **passed,
        task_manager=task_manager(cell.tasks, cell.include_path), random_seed=cell.seed,
        numpy_random_seed=cell.seed, torch_random_seed=cell.seed, fewshot_random_seed=cell.seed)
    record = copy.deepcopy(lm.record or {})  # counters the speed measurement below must not change
    metrics = {"eval_s": time.perf_counter() - start, **weight_bytes(lm.model)}
    memory = peak_memory(lm.device)
    metrics["peak_memory_bytes"] = memory.get("peak_allocated_bytes", memory.get("peak_rss_bytes"))
    metrics["planning_s"] = record.get("seconds")
    metrics["skip_rate"] = (record.get("skipping") or {}).get("skip_rate")
    metrics["experts_kept"] = json.dumps(record.get("experts_per_layer"), sort_keys=True)
    if cell.measure:
        m = cell.measure
        runner = lm.applied  # select plans are timed with their per-request selection
        pre = prefill_speed(lm.model, m["batch"], m["prompt_len"], m["reps"], m["warmup"], runner)
        dec = decode_speed(lm.model, m["batch"], min(32, m["prompt_len"]), m["new_tokens"], m["reps"], 1, runner)
        metrics.update(prefill_tokens_per_s=pre["tokens_per_s"], prefill_tokens_per_s_p90=pre["tokens_per_s_p90"],
                       decode_tokens_per_s=dec["tokens_per_s"], decode_tokens_per_s_p90=dec["tokens_per_s_p90"])
        for stage, speed in (("prefill", pre), ("decode", dec)):  # the spread over the repetitions
            metrics.update({f"{stage}_{k}": speed[k] for k in SPREAD})
        if m.get("latency_lengths"):
            latency, dropped = decode_latency(lm.model, m["latency_lengths"], m["batch"], m["new_tokens"],
                                              m["reps"], m["warmup"], runner)
            metrics["latency"] = latency
            if dropped:
                metrics["latency_dropped"] = {"prompt_len": dropped, "why": "prompt + new_tokens exceeds "
                                              f"max_position_embeddings={max_positions(lm.model)}"}
    write_items(folder, results.pop("samples", None))  # per-item values, for paired comparisons
    _write(folder, "results.json", portable(results))
    if not cell.is_baseline:  # the complete plan: kept sets, skip thresholds, selector state
        plan = copy.deepcopy(lm.applied.plan)
        plan.ratio = cell.ratio
        plan.extra.update({k: record[k] for k in ("keep_frequency", "skipping") if k in record})
        plan.save(os.path.join(folder, "plan.json"))
    _write(folder, "cell.json", portable({"id": meta["id"], "study": meta["study"], "spec": cell.to_dict(),
                                          "metrics": metrics, "env": environment(lm.model), "moebench": record}))
    atomic_write_text(os.path.join(folder, "DONE"), meta["id"] + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run one cell; exit 0 when it is done (now or before), 1 on failure (failure.json written),
    75 when another process holds the cell (nothing touched)."""
    from moebench.grid.executors.base import is_done
    from moebench.grid.guard import BUSY_EXIT, die_with_parent, holder, try_lock
    from moebench.grid.runner import clean_partial

    folder = (argv or sys.argv[1:])[0]
    die_with_parent()
    lock = try_lock(folder, wait_s=2.0)  # held until this process ends
    if lock is None:
        print(f"moebench cell: {folder} is running elsewhere ({holder(folder)}); left alone", file=sys.stderr)
        return BUSY_EXIT
    if is_done(folder):
        return 0
    clean_partial(folder)
    print(f"moebench cell: started {os.path.basename(os.path.abspath(folder))} (pid {os.getpid()})", flush=True)
    try:
        evaluate(folder)
        return 0
    except Exception:  # recorded for the user and retried by the next run, never swallowed
        _write(folder, "failure.json", {"traceback": traceback.format_exc(), "time": time.time()})
        print(traceback.format_exc(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
