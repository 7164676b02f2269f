"""`moebench recover PRUNED_DIR --kind lora --data SOURCE --out DIR`: a recovery stage on a pruned checkpoint.

Trains the checkpoint `moebench prune` wrote (`moebench.method.recover`: LoRA merged into the weights, the
routers by distillation from the unpruned model, or every weight) and writes a new checkpoint folder of the
same size and format: the weights, the tokenizer, ``plan.json`` and the model card, each saying what the
recovery did (``config.json`` ``moebench.recover``). ``router_kd`` needs the unpruned model: ``--teacher``,
by default the base model the checkpoint names (a hub id or testbed name; a local folder must be given).
"""

from __future__ import annotations

import argparse
import json
import os

from moebench.method.recover import KINDS, RecoverSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench recover`."""
    parser.add_argument("pruned", help="a checkpoint folder written by moebench prune")
    parser.add_argument("--kind", required=True, choices=KINDS, help="lora, router_kd or full (tiny models)")
    parser.add_argument("--data", required=True, help="training data, a calibration source: c4, file:PATH, "
                                                      "testbed:mix, testbed:<domain>, hf:...")
    parser.add_argument("--out", required=True, help="folder for the recovered checkpoint (new or empty)")
    parser.add_argument("--teacher", default=None, help="router_kd: the unpruned model (default: the base model the "
                                                         "checkpoint names)")
    for name, kind, text in (("steps", int, "optimizer steps (default 100)"),
                             ("lr", float, "learning rate (default: lora 5e-5, router_kd 1e-3, full 1e-5)"),
                             ("rank", int, "LoRA rank (default 8)"), ("alpha", int, "LoRA alpha (default 16)"),
                             ("expert-rank", int, "LoRA rank per expert (default max(1, round(rank x top_k / E)))"),
                             ("batch", int, "windows per step (default 4)"),
                             ("seq-len", int, "tokens per window (default min(2048, the model's positions))"),
                             ("warmup", float, "warm-up fraction of the steps (default 0.03)"),
                             ("seed", int, "data order and initialisation (default 0)"),
                             ("kd-top", int, "router_kd: teacher tokens kept per position (default 16)")):
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--stats-dir", default=None, help="cache of the teacher's targets (default: the statistics "
                                                          "cache, ~/.cache/moebench/stats)")


def run(args: argparse.Namespace) -> int:
    """Train the pruned checkpoint and write the recovered one."""
    import torch

    from moebench.calib.sources import availability_problem
    from moebench.method.plan import Plan
    from moebench.method.recover import cached_teacher_targets, recover
    from moebench.moe.card import write_card
    from moebench.moe.checkpoint import check_device, load_with_tokenizer, save_folder, save_pruned
    from moebench.util import check_new_folder

    spec = RecoverSpec.parse({"kind": args.kind, "data": args.data,
                              **{k: getattr(args, k) for k in ("steps", "lr", "rank", "alpha", "expert_rank", "batch",
                                                               "seq_len", "warmup", "seed", "kd_top")}}, "recover")
    plan_path = os.path.join(args.pruned, "plan.json")
    if not os.path.isfile(os.path.join(args.pruned, "config.json")) or not os.path.isfile(plan_path):
        raise ValueError(f"{args.pruned} is not a checkpoint written by moebench prune (it needs config.json and "
                         "plan.json); prune first: moebench prune MODEL --method ... --out DIR")
    if os.path.exists(os.path.join(args.out, "config.json")):
        raise ValueError(f"{args.out} already holds a checkpoint; choose an empty --out folder")
    for leftover in check_new_folder(os.path.abspath(args.out)):
        print(f"removed {leftover}, left by an interrupted run")
    plan = Plan.load(plan_path)
    with open(os.path.join(args.pruned, "config.json")) as f:
        record = json.load(f).get("moebench") or {}
    if plan.extra.get("recover"):
        raise ValueError(f"{args.pruned} was recovered already ({plan.extra['recover'].get('kind')}); recover the "
                         "pruned checkpoint it came from")
    problem = availability_problem(spec.data)
    if problem:
        raise OSError(problem)
    device = check_device(args.device)
    targets = None
    if spec.kind == "router_kd":
        teacher_name = args.teacher or record.get("base_model")
        if not teacher_name:
            raise ValueError("--kind router_kd distils from the unpruned model: give it with --teacher")
        try:
            teacher, teacher_tokenizer = load_with_tokenizer(teacher_name, dtype=args.dtype, device=device)
        except OSError as err:
            raise OSError(f"--kind router_kd: cannot load the unpruned model {teacher_name!r} ({err}); give it with "
                          "--teacher (a hub id or the folder the checkpoint was pruned from)") from err
        targets = cached_teacher_targets(teacher, teacher_tokenizer, spec, args.stats_dir, teacher_name)
        del teacher  # never beside the student
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    model, tokenizer = load_with_tokenizer(args.pruned, dtype=args.dtype, device=device)
    model, done = recover(model, tokenizer, spec, targets)
    plan.extra["recover"] = done
    record = {**record, "recover": done} if record else {}
    if record:
        model.config.moebench = record
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    files = {"checkpoint": lambda d: save_pruned(model, d, shown_as=args.out), "tokenizer": tokenizer.save_pretrained,
             "plan.json": lambda d: plan.save(os.path.join(d, "plan.json"))}
    if record:
        files["README.md"] = lambda d: write_card(d, record)
    save_folder(args.out, files)
    print(f"recover {spec.label()}: loss {done['loss_first_tenth']:.4f} -> {done['loss_last_tenth']:.4f} (mean of the "
          f"first / last tenth of the steps); {done['trained_parameters']:,} parameters trained in "
          f"{done['seconds']:.1f}s")
    print(f"saved to {args.out} (the recovery is recorded in plan.json, config.json and the model card)")
    return 0
