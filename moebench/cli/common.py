"""Arguments and helpers shared by the commands that load a model and may calibrate."""

from __future__ import annotations

import argparse
import logging

from moebench.calib.sources import availability_problem, calibration_size_problem
from moebench.method.pipeline import PlanRequest
from moebench.moe.checkpoint import (
    check_device,
    check_hub_config,
    load_with_tokenizer,
    quantized_on_device,
    resolve,
    sequential_needed,
)
from moebench.moe.layered import LayeredCheckpoint
from moebench.moe.view import MoEView

log = logging.getLogger(__name__)


def token_count(text: str) -> int:
    """A whole number of tokens >= 0 (0 = every calibration token), for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens (0 = every token)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 (0 = every calibration token)")
    return value


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by every command that may calibrate."""
    parser.add_argument("model", help="hub id, local folder or testbed model name")
    parser.add_argument("--calib", default=None, help="calibration source: c4, wikitext2, gsm8k, math, code, "
                                                      "file:PATH, testbed:mix, testbed:<domain>, hf:...")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default min(2048, the model's max positions))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subsample-tokens", type=token_count, default=None,
                        help="tokens whose every expert output is kept for NAEE, GRAPE, PREP (default 2048; "
                             "0 = every calibration token, as the NAEE authors)")
    parser.add_argument("--ratio-samples", type=token_count, default=None,
                        help="tokens whose gate ratio enters the skipping threshold beta (default 0 = every token)")
    parser.add_argument("--stats-dir", default=None, help="statistics cache (default ~/.cache/moebench/stats)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the hub repository's own model code (off by default; only for repositories you "
                             "trust). moebench still needs transformers >= 5 fused experts")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                        help="work one decoder layer at a time (weights read per layer from the safetensors "
                             "shards; memory bounded by a layer): for models larger than the device. Default: "
                             "on when the weights exceed the device's free memory")


def request_from(args, model, method: str = "none", **extra) -> PlanRequest:
    """A PlanRequest from parsed arguments; seq_len defaults to what the model can take."""
    seq_len = args.seq_len or min(2048, getattr(MoEView(model).config, "max_position_embeddings", 2048) or 2048)
    return PlanRequest(method=method, calib=args.calib, calib_samples=args.samples, calib_seq_len=seq_len,
                       seed=args.seed, stats_dir=args.stats_dir, model_id=args.model, revision=args.revision,
                       front_end="cli", subsample_tokens=args.subsample_tokens,
                       ratio_samples=args.ratio_samples, **extra)


def check_calibration_size(args) -> None:
    """Refuse bad or absurd ``--samples`` / ``--seq-len`` before any model is loaded.

    Without ``--seq-len`` the length is at most 2048 (the default is min(2048, the model's positions)).
    """
    problem = calibration_size_problem(args.samples, args.seq_len if args.seq_len is not None else 2048,
                                       ("--samples", "--seq-len"))
    if problem:
        raise ValueError(problem + ("" if args.seq_len is not None else " (--seq-len defaults to at most 2048)"))


def check_inputs(args) -> None:
    """Refuse at once, before any model is loaded, a hub id that is neither cached nor reachable and a calibration
    source that cannot be read now (each with what to do), instead of after retries or a loaded model."""
    import os

    from moebench.calib.cache import default_stats_dir

    path = resolve(args.model)
    if not os.path.isdir(path):
        check_hub_config(path, args.revision)
    if getattr(args, "calib", None):
        problem = availability_problem(args.calib, args.stats_dir or default_stats_dir(), args.samples, args.seed)
        if problem:
            raise OSError(problem)


def load(args):
    """Model and tokenizer named by the parsed arguments (calibration sizes are checked first).

    With ``--sequential`` (or by default when the weights exceed the device's free memory) the
    model is a meta-device skeleton opened layer by layer (`moebench.moe.layered`): statistics are
    collected one decoder layer at a time and a pruned checkpoint is written shard by shard.
    """
    check_calibration_size(args)
    device = check_device(args.device)  # a missing GPU is named before anything is loaded
    check_inputs(args)
    sequential = getattr(args, "sequential", False)
    if sequential is None:
        why = sequential_needed(args.model, device, args.revision)
        if why is None and getattr(args, "calib", None):
            why = quantized_on_device(args.model, device, args.revision)
        if why:
            log.warning(why)
        sequential = why is not None
    if sequential:
        from transformers import AutoTokenizer

        remote = bool(getattr(args, "trust_remote_code", False))
        layered = LayeredCheckpoint(args.model, dtype=args.dtype, device=device, revision=args.revision,
                                    trust_remote_code=remote)
        return layered.model, AutoTokenizer.from_pretrained(layered.path, trust_remote_code=remote)
    extra = {"revision": args.revision} if args.revision else {}
    if getattr(args, "trust_remote_code", False):
        extra["trust_remote_code"] = True
    return load_with_tokenizer(args.model, dtype=args.dtype, device=args.device, **extra)


def parse_params(pairs: list[str]) -> dict:
    """``["k=v", ...]`` -> ``{"k": "v"}`` (the method parses the values)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--param {pair!r}: write NAME=VALUE, e.g. --param seed=1")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key in out and out[key] != value.strip():
            raise ValueError(f"--param {key} is given twice ({key}={out[key]} and {key}={value.strip()}); give each "
                             "parameter once")
        out[key] = value.strip()
    return out
