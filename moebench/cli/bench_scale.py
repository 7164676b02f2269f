"""`moebench bench-scale`: memory and time of sequential calibration + streaming prune (`moebench.measure.scale`)."""

from __future__ import annotations

import argparse

from moebench.measure.scale import bench_scale, format_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench bench-scale`."""
    parser.add_argument("--model", default=None,
                        help="a local safetensors checkpoint to measure (default: build a random Qwen3-MoE-shaped "
                             "model with Qwen3-30B-A3B's layer shapes, removed afterwards)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the built model (default 12)")
    parser.add_argument("--experts", type=int, default=48,
                        help="experts per layer of the built model (default 48: 6.2 GiB at 12 layers; "
                             "Qwen3-30B-A3B has 128)")
    parser.add_argument("--samples", type=int, default=4, help="calibration sequences (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--method", default="reap", help="pruning method (default reap)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--work", default=None, help="folder for the model, statistics and pruned checkpoint "
                                                     "(default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep what the bench builds (default: removed)")
    parser.add_argument("--device", default="cpu", help="where the prune and the layer timing run (default cpu; "
                                                        "on cuda the GPU peak is reported too)")


def run(args: argparse.Namespace) -> int:
    """Build or take the model, measure, print the figures and the extrapolation."""
    for name in ("layers", "experts", "samples", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    from moebench.moe.checkpoint import check_device

    result = bench_scale(args.model, args.layers, args.experts, args.samples, args.seq_len, args.method,
                         args.ratio, keep=args.keep, work=args.work, device=check_device(args.device))
    print(format_report(result))
    return 0
