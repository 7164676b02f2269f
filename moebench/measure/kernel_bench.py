"""The moebench experts kernel vs transformers' default kernel on one MoE layer of real width.

`moebench bench-kernel` builds the routed experts of one layer from a published config (random
weights, the speed of a matmul does not depend on its values), routes random tokens with a random
router, and times each kernel on the same inputs: decode (1 and 8 tokens, batch 1 and 8) and a
prefill. Kernels run interleaved in a shuffled order per repetition (machine drift falls on all),
after warm-up, each call synchronised on an accelerator; the median per call is reported. Outputs are
checked against transformers' kernel. Any device and dtype (``--device cuda --dtype bfloat16``).
"""

from __future__ import annotations

import random
import statistics
import time
from contextlib import contextmanager

import torch

from moebench.moe import kernels

# One layer's routed experts, as published (hidden size, experts, top-k, expert intermediate size).
LAYERS = {
    "mixtral-8x7b": {"family": "mixtral", "hidden": 4096, "experts": 8, "top_k": 2, "intermediate": 14336},
    "qwen3-30b-a3b": {"family": "qwen3_moe", "hidden": 2048, "experts": 128, "top_k": 8, "intermediate": 768},
}


def real_layer_experts(name: str, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> tuple[torch.nn.Module, int]:
    """The fused experts module of one layer of ``name`` (random weights, on ``device``) and its top-k."""
    if name not in LAYERS:
        raise ValueError(f"unknown layer {name!r}; known: {', '.join(LAYERS)}")
    spec = LAYERS[name]
    if spec["family"] == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts

        config = MixtralConfig(hidden_size=spec["hidden"], num_local_experts=spec["experts"],
                               num_experts_per_tok=spec["top_k"], intermediate_size=spec["intermediate"])
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        config = Qwen3MoeConfig(hidden_size=spec["hidden"], num_experts=spec["experts"],
                                num_experts_per_tok=spec["top_k"], moe_intermediate_size=spec["intermediate"])
    experts = Experts(config).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return experts.to(device), spec["top_k"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def decode_max_tokens(n: int):
    """Run the moebench kernel with ``DECODE_MAX_TOKENS = n`` (0: the loop path always)."""
    previous, kernels.DECODE_MAX_TOKENS = kernels.DECODE_MAX_TOKENS, n
    try:
        yield
    finally:
        kernels.DECODE_MAX_TOKENS = previous


def candidates() -> dict:
    """The kernels timed: transformers' default, moebench as dispatched, and moebench's loop path."""
    from transformers.integrations.moe import ExpertsInterface

    default = ExpertsInterface._global_mapping["grouped_mm"]

    def loop(experts, hidden, index, weights):
        with decode_max_tokens(0):
            return kernels.moebench_experts_forward(experts, hidden, index, weights)

    return {"grouped_mm": default, "moebench": kernels.moebench_experts_forward, "moebench loop": loop}


@torch.no_grad()
def time_kernels(experts, top_k: int, tokens: int, reps: int = 15, warmup: int = 2, seed: int = 0) -> dict:
    """Median seconds per call of each kernel on ``tokens`` random tokens, and the largest output difference."""
    g = torch.Generator().manual_seed(seed)
    param = experts.gate_up_proj
    hidden = torch.randn(tokens, param.shape[-1 if not kernels.is_transposed(experts) else -2],
                         generator=g).to(param.device, param.dtype)
    weights, index = torch.randn(tokens, experts.num_experts, generator=g).softmax(-1).topk(top_k, -1)
    weights, index = weights.to(param.device, hidden.dtype), index.to(param.device)
    fns = candidates()
    reference = fns["grouped_mm"](experts, hidden, index, weights)
    diff = {n: (fn(experts, hidden, index, weights) - reference).float().abs().max().item() for n, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn(experts, hidden, index, weights)
    times = {n: [] for n in fns}
    order = list(fns)
    for rep in range(reps):
        random.Random(rep).shuffle(order)
        for n in order:
            _sync(param.device)
            start = time.perf_counter()
            fns[n](experts, hidden, index, weights)
            _sync(param.device)
            times[n].append(time.perf_counter() - start)
    return {"median_s": {n: statistics.median(t) for n, t in times.items()}, "max_diff": diff}


def bench_kernels(layers: list[str], tokens: list[int], reps: int = 15, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per (layer, token count): each kernel's median ms and its speed relative to grouped_mm."""
    rows = []
    for name in layers:
        experts, top_k = real_layer_experts(name, dtype, device)
        for n in tokens:
            r = time_kernels(experts, top_k, n, reps)
            base = r["median_s"]["grouped_mm"]
            rows.append({"layer": name, "tokens": n, "ms": {k: 1000 * v for k, v in r["median_s"].items()},
                         "speed_vs_default": {k: base / v for k, v in r["median_s"].items()},
                         "max_diff": max(r["max_diff"].values())})
        del experts
    return rows
