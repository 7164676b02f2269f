"""NAEE by recombination vs naive re-forward enumeration (`moebench bench-naee`).

Both search the same subsets with the same loss on the same calibration tokens, after one untimed
warm-up of each; `compare_naee` checks that they keep the same experts and returns the measured
times. The ratio grows with expert size: the naive search runs the experts once per subset, the
recombination only re-runs the router and reads per-token Gram matrices.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from moebench.method.pipeline import PlanRequest, plan_from_stats, statistics
from moebench.method.registry import resolve_budget
from moebench.moe.view import MoEView


def compare_naee(model, tokenizer, request: PlanRequest, ratio: float) -> dict:
    """Time both exhaustive enumerations layer by layer; returns times, kept sets and a summary."""
    from moebench.methods.naee import naive_exhaustive

    torch.manual_seed(0)
    view = MoEView(model)
    if max(view.experts_per_layer.values()) > 16:
        raise ValueError("bench-naee compares exhaustive enumerations: use a model with <= 16 experts per layer")
    request = replace(request, method="naee", ratio=ratio)
    t0 = time.perf_counter()
    stats = statistics(model, tokenizer, request, ["outputs"], progress=True)
    collect_s = time.perf_counter() - t0
    budget = resolve_budget(view, ratio=ratio)
    first = view.layers[0]  # warm-up of both searches (kernels, allocator), not timed
    plan_from_stats(view, "naee", {"search": "exhaustive"}, budget, stats, ratio=ratio)
    naive_exhaustive(first, stats[first.index], budget[first.index])
    t0 = time.perf_counter()
    plan = plan_from_stats(view, "naee", {"search": "exhaustive"}, budget, stats, ratio=ratio)
    recombine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = {layer.index: naive_exhaustive(layer, stats[layer.index], budget[layer.index]) for layer in view.layers}
    naive_s = time.perf_counter() - t0
    return {"layers": len(view.layers), "keep": sorted(set(budget.values())),
            "experts": sorted(set(view.experts_per_layer.values())),
            "tokens": stats[view.indices[0]]["inputs"].shape[0], "collect_s": collect_s,
            "recombine_s": recombine_s, "naive_s": naive_s, "same": naive == plan.keep}


# One MoE layer of real width (hidden size, top-k) at a chosen expert count.
# ``layers`` / ``experts``: the real model's MoE layers and experts per layer, for the whole-model figure.
BEAM_LAYERS = {"qwen3-30b-a3b": {"family": "qwen3_moe", "hidden": 2048, "top_k": 8, "intermediate": 768,
                                 "layers": 48, "experts": 128},
               "mixtral-8x7b": {"family": "mixtral", "hidden": 4096, "top_k": 2, "intermediate": 14336,
                                "layers": 32, "experts": 8}}


def real_width_layer(name: str, experts: int, tokens: int, seed: int = 0):
    """A one-layer model's MoE layer of ``name``'s widths with ``experts`` experts and synthetic
    ``outputs`` statistics for ``tokens`` tokens (random inputs and expert outputs, 128 tokens per
    sequence): what the search costs does not depend on the values."""
    if name not in BEAM_LAYERS:
        raise ValueError(f"unknown layer {name!r}; known: {', '.join(BEAM_LAYERS)}")
    spec = BEAM_LAYERS[name]
    if spec["family"] == "mixtral":
        from transformers import MixtralConfig
        from transformers import MixtralForCausalLM as Model

        config = MixtralConfig(hidden_size=spec["hidden"], num_local_experts=experts, num_experts_per_tok=spec["top_k"],
                               intermediate_size=8, num_hidden_layers=1, vocab_size=64, num_attention_heads=8,
                               num_key_value_heads=8)
    else:
        from transformers import Qwen3MoeConfig
        from transformers import Qwen3MoeForCausalLM as Model

        config = Qwen3MoeConfig(hidden_size=spec["hidden"], num_experts=experts, num_experts_per_tok=spec["top_k"],
                                moe_intermediate_size=8, intermediate_size=8, num_hidden_layers=1, vocab_size=64,
                                num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(seed)  # the router is the layer's real [E, H] linear; experts are never run
    layer = MoEView(Model(config)).layers[0]
    g = torch.Generator().manual_seed(seed)
    stats = {"inputs": torch.randn(tokens, spec["hidden"], generator=g),
             "all_outputs": torch.randn(tokens, experts, spec["hidden"], generator=g) * 0.02,
             "outputs_sample_ids": torch.arange(tokens) // 128}
    return layer, stats


def time_beam(name: str, experts: int, tokens: int, width: int = 8, ratio: float = 0.5,
              before: bool = True) -> dict:
    """Seconds of one layer's NAEE beam search with the Gram path and, if ``before``, with the gathered
    path (the only one beyond 32 experts before; same search, same kept set expected)."""
    import moebench.methods.naee as naee

    layer, stats = real_width_layer(name, experts, tokens)
    r = experts - round(ratio * experts)
    t0 = time.perf_counter()
    kept = naee.beam(layer, stats, r, width)
    result = {"layer": name, "experts": experts, "tokens": tokens, "keep": r, "gram_s": time.perf_counter() - t0}
    if before:
        limit, naee.GRAM_MAX_EXPERTS = naee.GRAM_MAX_EXPERTS, 0
        try:
            t0 = time.perf_counter()
            result["same"] = naee.beam(layer, stats, r, width) == kept
            result["gathered_s"] = time.perf_counter() - t0
        finally:
            naee.GRAM_MAX_EXPERTS = limit
    return result
