"""A grid cell evaluated by lm-eval's vLLM backend (``backend: vllm``).

The cell plans and applies its method exactly as an HF cell does (same statistics cache, same
plan), saves the pruned (or merged) checkpoint into ``<cell>/checkpoint`` in the family's own key
names (`moebench.moe.writers`), frees the model, then runs lm-eval's vLLM backend on that folder in
vLLM's own environment (`moebench.eval.vllm_env`) with the study's tasks and lm-eval settings. The
unpruned cell evaluates the source checkpoint itself. With ``sequential=true`` the checkpoint is
streamed layer by layer and never loaded whole.

Recorded as for an HF cell (``results.json``, ``items.csv.gz``, ``plan.json``, ``cell.json``),
plus ``backend``, the vLLM version, vLLM's start-up seconds (engine built: checkpoint loaded, KV
cache allocated) and the evaluation loop's seconds and requests. The HF cell's memory and speed
measurements (resident weights, load and run peaks, tokens/s against the unpruned model in one
process) are not taken: vLLM runs in another process with its own memory manager. The parameters,
expert bytes and the checkpoint's bytes on disk are recorded. The checkpoint is removed once the
cell is scored unless the study sets ``keep_checkpoints: true``.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil

from moebench.util import atomic_write_json, atomic_write_text

CHECKPOINT = "checkpoint"
LOG = "vllm.log"


def default_vllm_args(device: str) -> dict:
    """Defaults under the study's ``vllm_args``: on CPU, eager mode (compiling the graph costs minutes on a few
    cores and changes no score)."""
    return {"enforce_eager": True} if device == "cpu" else {}


def run_vllm_cell(folder: str, meta: dict, cell) -> None:
    """Prune, save, evaluate with vLLM, write the cell's files (DONE last)."""
    import torch

    from moebench.eval.vllm_env import find_python, read_marker
    from moebench.grid.items import count_requests, write_items
    from moebench.grid.record import moebench_environment, portable
    from moebench.moe.checkpoint import default_device, resolve
    from moebench.moe.formats import disk_bytes
    from moebench.tasks import task_paths

    python, environment = find_python(meta.get("vllm_python"))  # before any work: say now when there is none
    target = os.path.join(folder, CHECKPOINT)
    if os.path.exists(target):  # a leftover of an interrupted run
        shutil.rmtree(target)
    if cell.is_baseline:
        checkpoint, record, plan = resolve(cell.model), _baseline_record(cell), None
    else:
        checkpoint, record, plan = _prune_and_save(cell, meta, target)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the GPU is vLLM's now
    device = (read_marker(os.path.dirname(os.path.dirname(python))) or {}).get("device") or \
        ("cpu" if environment.get("VLLM_TARGET_DEVICE") == "cpu" else default_device())
    vllm_args = {"dtype": cell.dtype, "seed": cell.seed, "batch_size": "auto", **default_vllm_args(device),
                 **(cell.vllm_args or {})}
    paths, defaults = task_paths(cell.tasks, cell.include_path)
    passed = {k: v for k, v in cell.lm_eval.items() if k != "batch_size"}
    from moebench.eval.vllm_env import run_vllm_eval

    answer = run_vllm_eval(checkpoint, list(cell.tasks), paths, defaults, cell.seed, vllm_args, passed,
                           python=python, log_path=os.path.join(folder, LOG))
    results = answer["results"]
    samples = results.pop("samples", None)
    requests = count_requests(samples)
    metrics = {"eval_s": answer["loop_s"], "vllm_startup_s": answer["startup_s"], "eval_requests": requests,
               "eval_requests_per_s": requests / answer["loop_s"] if answer["loop_s"] > 0 else None,
               "planning_s": record.get("seconds"), "experts_kept": json.dumps(record.get("experts_per_layer"),
                                                                                sort_keys=True),
               "parameters": record["parameters"]["after"], "expert_bytes": record["expert_bytes"]["after"],
               "checkpoint_bytes": disk_bytes(checkpoint) if os.path.isdir(checkpoint) else None,
               "speed_pairing_note": "backend vllm: no per-token speed or memory peaks measured; the evaluation "
                                     "loop's requests/s is recorded"}
    if record.get("recover"):
        metrics.update(recover_s=record["recover"]["seconds"], recover_loss_first=record["recover"]["loss_first_tenth"],
                       recover_loss_last=record["recover"]["loss_last_tenth"])
    write_items(folder, samples)
    atomic_write_json(os.path.join(folder, "results.json"), portable(results))
    if plan is not None:
        plan = copy.deepcopy(plan)
        plan.ratio = cell.ratio
        plan.extra.update({k: record[k] for k in ("keep_frequency", "recover") if k in record})
        plan.save(os.path.join(folder, "plan.json"))
    versions = answer["versions"]
    env = {**moebench_environment(), "backend": "vllm", "vllm_version": versions["vllm"],
           "vllm_torch_version": versions["torch"], "vllm_transformers_version": versions["transformers"],
           "lm_eval_version": versions["lm_eval"], "device": device, "dtype": vllm_args["dtype"],
           "vllm_args": vllm_args}
    atomic_write_json(os.path.join(folder, "cell.json"), portable({
        "id": meta["id"], "study": meta["study"], "spec": cell.to_dict(), "metrics": metrics, "env": env,
        "moebench": record}))
    if not meta.get("keep_checkpoint") and os.path.isdir(target):
        shutil.rmtree(target)
    atomic_write_text(os.path.join(folder, "DONE"), meta["id"] + "\n")


def _baseline_record(cell) -> dict:
    """Sizes of the unpruned model, from its config alone (no weights are loaded for a vLLM baseline)."""
    from moebench.eval.model import model_sizes
    from moebench.moe.checkpoint import load_structure
    from moebench.moe.view import MoEView

    model = load_structure(cell.model)
    params, experts = model_sizes(model)
    try:
        per_layer = {str(k): v for k, v in sorted(MoEView(model).experts_per_layer.items())}
    except ValueError:
        per_layer = {}
    sizes = {"before": params, "after": params, "if_pruned": params}
    return {"method": "none", "parameters": sizes, "experts_per_layer": per_layer,
            "expert_bytes": {"before": experts, "after": experts, "if_pruned": experts}}


def _prune_and_save(cell, meta: dict, target: str):
    """Plan and apply the cell's method as an HF cell does; the checkpoint folder, the record and the plan.
    ``sequential=true`` cells were streamed to the pruned-checkpoint cache by the model's constructor."""
    from moebench.eval.args import split_model_args
    from moebench.eval.model import PrunedMoELM
    from moebench.moe.checkpoint import default_device, per_layer_counts, save_folder
    from moebench.moe.formats import raw_config
    from moebench.moe.writers import checkpoint_writer

    args = cell.model_args(meta.get("stats_dir"), meta.get("device") or default_device())
    hf, own, params = split_model_args(args)
    if own.get("sequential") in (True, "true", "True"):  # streamed to disk; vLLM loads it, moebench never does
        return _prune_streaming(hf, own, params)
    lm = PrunedMoELM(**args)
    record = copy.deepcopy(lm.apply_plan())
    plan = lm.applied.plan
    counts = per_layer_counts(lm.model.config)
    if counts is not None:
        raise ValueError(f"{cell.method} kept {sorted(set(counts.values()))} experts in different layers; vLLM "
                         "builds every MoE layer with one count and cannot load this checkpoint: use backend: hf")
    source = lm.source["path"]
    writer = checkpoint_writer(lm.model, None, source, raw_config(source), plan, _counts_before(source), None, None,
                               target, weights_changed=bool(record.get("recover")),
                               layout="duplicated")  # a merge keeping every router row: vLLM reads the plain form
    save_folder(target, {"checkpoint": writer, "tokenizer": lm.tokenizer.save_pretrained})
    del lm
    return target, record, plan


def _prune_streaming(hf: dict, own: dict, params: dict):
    """``sequential=true``: plan on a layer-by-layer skeleton and write the checkpoint shard by shard
    (`moebench.eval.model.prune_sequentially`); the sizes after are counted on the written checkpoint's skeleton."""
    import time

    from moebench.eval.args import PrunedMoESettings
    from moebench.eval.model import model_sizes, prune_sequentially
    from moebench.method.plan import Plan
    from moebench.moe.checkpoint import load_structure

    settings = PrunedMoESettings.from_args(own, params)
    pretrained = hf.pop("pretrained")
    start = time.perf_counter()
    folder, before = prune_sequentially(pretrained, settings, hf, layout="duplicated")  # the form vLLM reads
    plan = Plan.load(os.path.join(folder, "plan.json"))
    after = model_sizes(load_structure(folder))
    record = {"method": settings.method, "params": settings.params, "ratio": settings.ratio, "calib": plan.calib,
              "seed": settings.seed, "sequential": folder, "seconds": round(time.perf_counter() - start, 3),
              "parameters": {"before": before[0], "after": after[0], "if_pruned": after[0]},
              "expert_bytes": {"before": before[1], "after": after[1], "if_pruned": after[1]},
              "experts_per_layer": {str(k): v for k, v in sorted(plan.experts_kept().items())},
              "kept_experts": {str(k): v for k, v in sorted(plan.keep.items())}}
    return folder, record, plan


def _counts_before(source: str) -> dict[int, int]:
    """Experts per MoE layer of the source checkpoint (from its config)."""
    from moebench.moe.checkpoint import load_structure
    from moebench.moe.view import MoEView

    return dict(MoEView(load_structure(source)).experts_per_layer)
