"""`moebench bench-beam`: NAEE's beam search, seconds per layer at real widths and many experts."""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from moebench.cli.common import token_count
from moebench.measure.naee_bench import BEAM_LAYERS, time_beam


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench bench-beam`."""
    parser.add_argument("--layers", default="qwen3-30b-a3b", help=f"comma-separated, of: {', '.join(BEAM_LAYERS)}")
    parser.add_argument("--experts", default="16,64,128", help="experts per layer, comma-separated (default 16,64,128)")
    parser.add_argument("--tokens", type=token_count, default=2048,
                        help="cached tokens per layer (default 2048, the outputs subsample's default)")
    parser.add_argument("--width", type=int, default=8, help="beam width (default 8, naee's default)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of experts removed (default 0.5)")
    parser.add_argument("--gathered", action="store_true",
                        help="also time the search without Gram matrices (slow beyond 32 experts)")


def _experts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--experts {text!r}: give comma-separated whole numbers, e.g. 16,64,128") from None
    if any(count < 2 for count in counts):
        raise ValueError(f"--experts {text!r}: every count must be >= 2")
    return counts


def run(args: argparse.Namespace) -> int:
    """Time one layer's beam search per (layer, expert count) and print the whole-model projection."""
    names = args.layers.split(",")
    unknown = [name for name in names if name not in BEAM_LAYERS]
    if unknown:
        raise ValueError(f"--layers: unknown {', '.join(unknown)}; known: {', '.join(BEAM_LAYERS)}")
    if not 0 < args.ratio < 1:
        raise ValueError(f"--ratio {args.ratio} must be between 0 and 1 (exclusive)")
    if args.tokens < 128:
        raise ValueError(f"--tokens {args.tokens} must be >= 128 (one calibration sequence of the synthetic cache)")
    rows = []
    for name in names:
        spec = BEAM_LAYERS[name]
        for experts in _experts(args.experts):
            keep = experts - round(args.ratio * experts)
            if keep < spec["top_k"]:
                raise ValueError(f"--experts {experts} at --ratio {args.ratio} keeps {keep} experts, fewer than "
                                 f"{name}'s top-{spec['top_k']}: give more experts or a lower ratio")
            r = time_beam(name, experts, args.tokens, args.width, args.ratio, before=args.gathered)
            total = r["gram_s"] * spec["layers"]
            whole = "-" if experts != spec["experts"] else (
                f"{total / 3600:.2f} h" if total >= 3600 else f"{total:.0f} s") + f" ({spec['layers']} layers)"
            rows.append((name, experts, r["keep"], args.tokens, f"{r['gram_s']:.1f}",
                         f"{r['gathered_s']:.1f} (same: {'yes' if r['same'] else 'NO'})" if args.gathered else "-",
                         whole))
    print(f"NAEE beam search (width {args.width}, then swaps), one MoE layer of real width, random router and "
          f"cached outputs, float32, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["layer", "experts", "keep", "tokens", "seconds per layer", "without Gram, s",
                                  "beam, whole model at its expert count"]))
    return 0
