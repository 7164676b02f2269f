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
import sys
import time
import traceback
from typing import TYPE_CHECKING

from moebench.grid.record import moebench_environment, portable
from moebench.measure.load import Slot
from moebench.util import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from moebench.grid.spec import Cell


def _write(folder: str, name: str, data) -> None:
    atomic_write_json(os.path.join(folder, name), data)


def environment(model) -> dict:
    """Versions, git sha, device, dtype and expert kernel of this run."""
    import lm_eval
    import torch
    import transformers

    param = next(model.parameters())
    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "lm_eval_version": lm_eval.__version__, **moebench_environment(),
            "device": str(param.device), "dtype": str(param.dtype).replace("torch.", ""),
            "expert_kernel": getattr(model.config, "_experts_implementation", None),
            "gpu": torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else None}


def evaluate(folder: str, slot=None) -> None:
    """Run the cell in ``folder`` and write its result files (DONE last).

    Order, so that each figure means what its name says (`moebench.measure.memory`,
    `moebench.measure.reference`): load the model; decide the speed pairing; (sequential pairing
    only) time the unpruned model; apply the method; read the load peak and reset it; evaluate; time
    the variant alone (latency, one pass of each timed workload) and read the run peak; then load
    the unpruned reference and time both interleaved. ``slot``: this machine's timing slot
    (`moebench.measure.load.Slot`), held shared while working and exclusively while timing; one is
    taken here when not given.
    """
    from moebench.grid.spec import Cell

    with open(os.path.join(folder, "spec.json")) as f:
        meta = json.load(f)
    cell = Cell.from_dict(meta["spec"])
    if cell.backend == "vllm":  # prune, save, and let lm-eval's vLLM backend score the checkpoint
        from moebench.grid.vllm_cell import run_vllm_cell

        run_vllm_cell(folder, meta, cell)
        return
    own = slot is None
    if own:
        slot = Slot()
        slot.shared()
    try:
        _run(folder, meta, cell, slot)
    finally:
        if own:
            slot.close()


def _run(folder: str, meta: dict, cell: Cell, slot) -> None:
    from moebench.eval.model import PrunedMoELM
    from moebench.grid.items import write_items
    from moebench.measure.memory import MemoryMeter, model_devices
    from moebench.measure.reference import needs_moebench_kernel, plan_pairing, time_alone
    from moebench.method.apply import unchanged
    from moebench.moe.checkpoint import default_device, free_bytes

    lm = PrunedMoELM(**cell.model_args(meta.get("stats_dir"), meta.get("device") or default_device()))
    pairing = plan_pairing(cell.is_baseline, lm.presliced, lm.unpruned_bytes, free_bytes(lm.device)) \
        if cell.measure else ("", "")
    before = None
    if pairing[0] == "sequential":
        with slot.exclusive():
            before = time_alone(unchanged(lm.model), cell.measure, needs_moebench_kernel(lm.settings))
    lm.apply_plan()
    meter = MemoryMeter(model_devices(lm.model))
    meter.end_load()
    results, record, metrics = _evaluate(lm, cell)
    from moebench.grid.items import count_requests

    metrics["eval_requests"] = count_requests(results.get("samples"))
    metrics["eval_requests_per_s"] = metrics["eval_requests"] / metrics["eval_s"] if metrics["eval_s"] > 0 else None
    metrics.update(_measure(lm, meter, cell, slot, pairing, before))
    write_items(folder, results.pop("samples", None))  # per-item values, for paired comparisons
    _write(folder, "results.json", portable(results))
    if not cell.is_baseline:  # the complete plan: kept sets, skip thresholds, selector state
        plan = copy.deepcopy(lm.applied.plan)
        plan.ratio = cell.ratio
        plan.extra.update({k: record[k] for k in ("keep_frequency", "skipping", "recover") if k in record})
        plan.save(os.path.join(folder, "plan.json"))
    _write(folder, "cell.json", portable({"id": meta["id"], "study": meta["study"], "spec": cell.to_dict(),
                                          "metrics": metrics, "env": environment(lm.model), "moebench": record}))
    atomic_write_text(os.path.join(folder, "DONE"), meta["id"] + "\n")


def _evaluate(lm, cell: Cell) -> tuple[dict, dict, dict]:
    """lm-eval on the cell's tasks: ``(results, record, metrics)``."""
    import lm_eval

    from moebench.tasks import task_manager

    start = time.perf_counter()
    passed = {k: v for k, v in cell.lm_eval.items() if k != "batch_size"}  # batch_size is the model's
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(cell.tasks), **passed,
        task_manager=task_manager(cell.tasks, cell.include_path), random_seed=cell.seed,
        numpy_random_seed=cell.seed, torch_random_seed=cell.seed, fewshot_random_seed=cell.seed)
    record = copy.deepcopy(lm.record or {})  # counters the speed measurement below must not change
    metrics = {"eval_s": time.perf_counter() - start, "planning_s": record.get("seconds"),
               "skip_rate": (record.get("skipping") or {}).get("skip_rate"),
               "experts_kept": json.dumps(record.get("experts_per_layer"), sort_keys=True)}
    if record.get("recover"):  # the recovery stage's cost and what its loss did
        metrics.update(recover_s=record["recover"]["seconds"], recover_loss_first=record["recover"]["loss_first_tenth"],
                       recover_loss_last=record["recover"]["loss_last_tenth"])
    return results, record, metrics


def _measure(lm, meter, cell: Cell, slot, pairing: tuple[str, str], before) -> dict:
    """Resident weights, load and run peaks, and (with ``measure``) the speed figures."""
    from moebench.measure.load import CpuLoad
    from moebench.measure.memory import resident_bytes
    from moebench.measure.reference import load_reference, measure_speed, release
    from moebench.measure.speed import decode_latency, max_positions, prefill_speed

    offloader = lm.applied.offloader
    out = resident_bytes(lm.model, offloader.host_bytes if offloader is not None else 0)
    out["weight_bytes_by_device"] = json.dumps(out.pop("by_device"), sort_keys=True)
    out["parameters"] = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
    if offloader is not None:  # what the working sets held on the device at most
        out["offload_device_expert_bytes_peak"] = offloader.counters["resident_bytes_peak"]
    out.update(load_peak_bytes=meter.load_peak, **meter.describe())
    if not cell.measure:
        out["run_peak_bytes"] = meter.run_peak()
        return out
    m, runner = cell.measure, lm.applied  # select plans are timed with their per-request selection
    with slot.exclusive(), CpuLoad() as load:
        prefill_speed(lm.model, m["batch"], m["prompt_len"], 1, 0, runner)  # the variant's own timed pass
        runner.generate(_ids_like(lm.model, m), m["new_tokens"])
        if m.get("latency_lengths"):
            latency, dropped = decode_latency(lm.model, m["latency_lengths"], m["batch"], m["new_tokens"],
                                              m.get("latency_reps", m["reps"]), m["warmup"], runner)
            out["latency"] = latency
            if dropped:
                out["latency_dropped"] = {"prompt_len": dropped, "why": "prompt + new_tokens exceeds "
                                          f"max_position_embeddings={max_positions(lm.model)}"}
        out["run_peak_bytes"] = meter.run_peak()  # before the reference is loaded
        reference = None
        if pairing[0] == "interleaved":
            src = lm.source
            reference = load_reference(src["path"], lm.model, src["revision"], src["trust_remote_code"])
        out.update(measure_speed(runner, m, pairing[0], reference, before))
        if reference is not None:
            release(reference)
    out.update(speed_pairing_note=pairing[1], **load.record())
    return out


def _ids_like(model, m: dict):
    from moebench.measure.speed import _ids

    return _ids(model, m["batch"], min(32, m["prompt_len"]), seed=1)


def main(argv: list[str] | None = None) -> int:
    """Run one cell; exit 0 when it is done (now or before), 1 on failure (failure.json written),
    75 when another process holds the cell (nothing touched)."""
    slot = Slot()  # first: the imports below are heavy and must never run while another cell times
    slot.shared()
    from moebench.grid.executors.base import is_done
    from moebench.grid.guard import BUSY_EXIT, die_with_parent, holder, try_lock
    from moebench.grid.index import mark
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
    mark(folder, "running")
    print(f"moebench cell: started {os.path.basename(os.path.abspath(folder))} (pid {os.getpid()})", flush=True)
    try:
        evaluate(folder, slot)
        mark(folder, "done")
        return 0
    except Exception:  # recorded for the user and retried by the next run, never swallowed
        _write(folder, "failure.json", {"traceback": traceback.format_exc(), "time": time.time()})
        print(traceback.format_exc(), file=sys.stderr)
        mark(folder, "failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
