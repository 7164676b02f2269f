"""`moebench bench-kernel`: the moebench experts kernel vs transformers' default at real widths."""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from moebench.measure.kernel_bench import LAYERS, bench_kernels
from moebench.moe.checkpoint import check_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench bench-kernel`."""
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated, of: {', '.join(LAYERS)}")
    parser.add_argument("--tokens", default="1,8,512",
                        help="tokens per call, comma-separated (decode batch 1 = 1, batch 8 = 8; prefill: more)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    """Print each kernel's median time per call and its speed relative to transformers' grouped_mm."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = check_device(args.device)
    rows = bench_kernels(args.layers.split(","), [int(t) for t in args.tokens.split(",")], args.reps, device,
                         getattr(torch, args.dtype))
    names = list(rows[0]["ms"])
    where = f"{torch.get_num_threads()} threads" if torch.device(device).type == "cpu" else \
        torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else device
    print(f"experts kernels, one layer of real width, random weights, {args.dtype}, {device} ({where}), "
          f"{args.reps} interleaved reps, median ms per call (speed vs grouped_mm)")
    print(tabulate([(r["layer"], r["tokens"], *(f"{r['ms'][n]:.2f} ({r['speed_vs_default'][n]:.2f}x)" for n in names),
                     f"{r['max_diff']:.1e}") for r in rows], headers=["layer", "tokens", *names, "max |diff|"]))
    return 0
