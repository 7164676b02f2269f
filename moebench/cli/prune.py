"""`moebench prune MODEL --method M --ratio R --calib C --out DIR`: plan, prune (or merge), save.

With ``--sequential`` (default when the weights exceed the device's free memory) calibration runs
one decoder layer at a time and the checkpoint is written shard by shard from the source shards
(`moebench.moe.streaming`): the model is never in memory whole.

``DIR`` appears complete or not at all: the files are written into a temporary sibling folder
that is renamed into place at the end (`moebench.moe.checkpoint.save_folder`); it holds the
checkpoint, the tokenizer, ``plan.json`` and the model card ``README.md``.
"""

from __future__ import annotations

import argparse
import os
import time

from moebench.cli.common import add_calibration_arguments, load, parse_params, request_from
from moebench.method.pipeline import prepare
from moebench.method.registry import get_method, sequential_refusal
from moebench.moe.card import provenance, record_provenance, write_card
from moebench.moe.checkpoint import local_folder, save_folder
from moebench.moe.formats import (
    disk_summary,
    format_name,
    mtp_kept,
    parse_save_dtype,
    raw_config,
    writer_refusal,
)
from moebench.moe.layered import LAYERED_ATTR
from moebench.moe.view import MoEView
from moebench.moe.writers import checkpoint_writer
from moebench.util import check_new_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench prune`."""
    add_calibration_arguments(parser)
    parser.add_argument("--method", required=True, help="a registered method (moebench methods lists them)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, help="fraction of routed experts removed (0.5 = half)")
    budget.add_argument("--keep", type=int, help="experts kept per MoE layer")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter of the method (repeatable)")
    parser.add_argument("--out", required=True, help="output folder: checkpoint + plan.json")
    parser.add_argument("--layout", choices=("compact", "duplicated"), default="compact",
                        help="how a merge that keeps every router row (hc_smoe / m_smoe router=all, sub_moe) is "
                             "written: compact (the merged experts once and the expert map; moebench loads it) or "
                             "duplicated (every router slot its own copy of its merged expert: a plain checkpoint that "
                             "transformers and vLLM load, no memory saved); other plans are written alike")
    parser.add_argument("--save-dtype", default=None, metavar="DTYPE",
                        help="write the checkpoint dequantized / cast to bf16, fp16 or fp32 (default: the source's "
                             "own format: FP8 stays FP8, MXFP4 stays MXFP4, bf16 stays bf16)")


def run(args: argparse.Namespace) -> int:
    """Plan, prune (or merge) physically, save checkpoint, tokenizer, plan.json and the model card."""
    if os.path.exists(os.path.join(args.out, "config.json")):
        raise ValueError(f"{args.out} already holds a checkpoint; choose an empty --out folder")
    for leftover in check_new_folder(os.path.abspath(args.out)):  # before any work
        print(f"removed {leftover}, left by an interrupted run")
    spec = get_method(args.method)
    if spec.kind not in ("prune", "merge") or spec.is_identity:
        raise ValueError(f"moebench prune writes one static checkpoint; method {args.method} is "
                         f"{'the unpruned model' if spec.is_identity else f'a {spec.kind} method'}: evaluate it "
                         f"with lm_eval --model pruned_moe --model_args ...,method={args.method} instead")
    save_dtype = parse_save_dtype(args.save_dtype)
    params = parse_params(args.param)
    needs = spec.needs_for(spec.parse_params(params))
    if needs and not args.calib:  # before the (possibly long) load
        raise ValueError(f"method {spec.name} needs calibration statistics ({', '.join(needs)}); give a "
                         "calibration source, e.g. --calib c4 or --calib testbed:mix")
    if args.sequential:  # before the load: the method cannot plan on a layer-by-layer skeleton
        spec.check_sequential(params)
    model, tokenizer = load(args)
    layered = getattr(model, LAYERED_ATTR, None)
    if layered is not None:  # --sequential by default (the model exceeds the device): before calibrating
        spec.check_sequential(params)
    source = layered.path if layered is not None else local_folder(args.model, args.revision)
    source_config = raw_config(source)
    refusal = writer_refusal(source_config, source, merges=spec.kind == "merge", uniform=True, save_dtype=save_dtype)
    if refusal:  # before calibrating: the plan could not be written
        raise ValueError(f"{args.model}: {refusal}")
    before, experts_before = MoEView(model).expert_bytes(), MoEView(model).experts_per_layer
    request = request_from(args, model, method=args.method, ratio=args.ratio, keep=args.keep, params=params)
    start = time.perf_counter()
    try:
        plan = prepare(model, tokenizer, request).plan  # on a layered skeleton: plans and reshapes the meta model
    except (NotImplementedError, RuntimeError) as err:
        if layered is None or "meta" not in str(err):
            raise
        raise ValueError(sequential_refusal(spec.name)) from err  # one that did not declare reads_weights
    after = MoEView(model).expert_bytes()
    uniform = len(set(plan.experts_kept().values())) == 1
    refusal = writer_refusal(source_config, source, merges=bool(plan.merge), uniform=uniform, save_dtype=save_dtype)
    if refusal:
        raise ValueError(f"{args.model}: {refusal}")
    record = provenance(args.model, plan.method, paper=spec.paper, params=plan.params, ratio=args.ratio,
                        keep=args.keep, calib=plan.calib, kept=plan.keep, experts_before=experts_before,
                        expert_bytes=(before, after), revision=args.revision)
    record["format"] = {"source": format_name(source_config, source),
                        "dequantized_to": str(save_dtype).removeprefix("torch.") if save_dtype else None}
    if plan.expert_map:  # the card says who can load it
        record["layout"] = args.layout
    if plan.novice:  # MoNE: replaced experts answer with constants (the card says who can load it)
        record["novice_experts"] = {str(i): entry["experts"] for i, entry in sorted(plan.novice.items())}
    mtp = mtp_kept(source_config, plan.keep, source)
    if mtp:
        record["mtp_kept_experts"] = {str(i): ids for i, ids in mtp.items()}
    record_provenance(model, record)  # config.json's "moebench" key
    checkpoint = checkpoint_writer(model, layered, source, source_config, plan, experts_before, record, save_dtype,
                                   args.out, layout=args.layout)
    save_folder(args.out, {"checkpoint": checkpoint,
                           "tokenizer": tokenizer.save_pretrained,
                           "plan.json": lambda d: plan.save(os.path.join(d, "plan.json")),
                           "README.md": lambda d: write_card(d, record, disk=disk_summary(source, d))})
    disk = disk_summary(source, args.out)
    print(f"{plan.method}: kept {sorted(set(plan.experts_kept().values()))} experts per layer; expert bytes "
          f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB; planned in {time.perf_counter() - start:.1f}s")
    print(f"checkpoint on disk: {disk['format_before']}, {disk['bytes_before'] / 1e6:.2f} MB -> "
          f"{disk['format_after']}, {disk['bytes_after'] / 1e6:.2f} MB"
          + (f"; MTP layer(s) {', '.join(map(str, mtp))} pruned with the last MoE layer's kept ids" if mtp else ""))
    print(f"saved to {args.out} (plan.json and a model card, README.md, beside the checkpoint)")
    return 0
