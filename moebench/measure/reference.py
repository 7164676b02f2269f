"""A variant's speed against its model's unpruned reference, as grid cells measure it.

`plan_pairing` decides before the method is applied how the reference is timed:

- ``interleaved`` (the default): after the evaluation the unpruned model is loaded a second time in
  this process (same checkpoint, dtype, device) and both are timed in alternation
  (`moebench.measure.paired`);
- ``sequential``: when no second copy fits in the device's free memory, the unpruned model is timed
  in this process before the method is applied, and the variant after its evaluation; the ratio is
  then over every (reference, variant) pair of repetitions, and reports treat it as unpaired;
- ``self``: the unpruned cell itself (speedup 1 by definition);
- ``none``: no reference could be timed (the variant was loaded pruned and no copy fits); the
  reason is recorded.

Both sides run in the same experts kernel: a variant that needs moebench's kernel (skipping,
offloading) is compared with the reference in moebench's kernel, and also with the reference in its
default kernel (``*_default_kernel`` figures). A skipping variant is also timed with its skip rules
paused (the same pruning in the same kernel: ``skip_*`` figures, what skipping alone buys).
"""

from __future__ import annotations

import itertools

import torch

from moebench.measure.paired import Side, paired_speed, ratio_summary, summarise_ratios
from moebench.measure.speed import summary
from moebench.method.apply import Applied, unchanged
from moebench.moe.kernels import KERNEL_NAME, SKIP_ATTR, experts_kernel, register
from moebench.moe.skipping import skipping_paused

ROOM_FACTOR = 1.15  # a second copy needs its weights plus room for activations and the allocator's slack


def variant_kernel(model) -> str | None:
    """The experts kernel the model runs in now."""
    return getattr(model.config, "_experts_implementation", None)


def needs_moebench_kernel(settings) -> bool:
    """Whether a `PrunedMoESettings` variant will run in moebench's kernel (skipping or offloading)."""
    return settings.skip != "none" or bool(settings.offload)


def plan_pairing(is_baseline: bool, presliced: bool, reference_bytes: int, free: int | None) -> tuple[str, str]:
    """``(pairing, note)`` for a cell (see the module docstring); ``free``: the device's free bytes now."""
    if is_baseline:
        return "self", "the unpruned cell: speedup 1 by definition"
    if free is None or free >= ROOM_FACTOR * reference_bytes:
        return "interleaved", ""
    note = (f"a second unpruned copy ({reference_bytes / 2**30:.2f} GiB) does not fit in the free memory "
            f"({free / 2**30:.2f} GiB)")
    if presliced:
        return "none", note + " and the variant was loaded pruned (sequential=true): no reference timing"
    return "sequential", note + ": the reference was timed before the method was applied, not interleaved"


def load_reference(path: str, like, revision: str | None = None, trust_remote_code: bool = False):
    """The unpruned model from ``path`` with the dtype and device of the model ``like``, in eval mode."""
    from transformers import AutoModelForCausalLM

    from moebench.moe.checkpoint import loading_bars

    param = next(like.parameters())
    with loading_bars():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=param.dtype, revision=revision,
                                                     trust_remote_code=trust_remote_code,
                                                     device_map={"": str(param.device)})
    return model.eval()


def sides(variant: Applied, reference_model) -> tuple[Side, Side, list[Side]]:
    """The variant, the reference in the variant's kernel, and the extra sides (reference in its default
    kernel where that differs; the variant with skipping paused where it skips)."""
    vk, rk = variant_kernel(variant.model), variant_kernel(reference_model)
    if vk == KERNEL_NAME:
        register()
    ref_runner = unchanged(reference_model)
    reference = Side("reference", ref_runner, lambda: experts_kernel(reference_model, vk))
    extra = []
    if vk != rk:
        extra.append(Side("reference_default_kernel", ref_runner, lambda: experts_kernel(reference_model, rk)))
    if any(hasattr(m, SKIP_ATTR) for m in variant.model.modules()):
        extra.append(Side("variant_no_skip", variant, lambda: skipping_paused(variant.model)))
    return Side("variant", variant), reference, extra


def cross_ratio_summary(reference: list[float], variant: list[float]) -> dict:
    """`summarise_ratios` over every (reference, variant) combination of repetitions: for times not taken
    in pairs (its interval treats the combinations as independent, which they are not: read it as a spread)."""
    return summarise_ratios([r / max(v, 1e-12) for r, v in itertools.product(reference, variant)])


def time_alone(applied: Applied, m: dict, moebench_kernel: bool = False) -> dict:
    """Times of one model alone (the reference before the method, for ``sequential`` pairing)."""
    if moebench_kernel:
        register()
    side = Side("alone", applied, (lambda: experts_kernel(applied.model, KERNEL_NAME)) if moebench_kernel else None)
    return paired_speed([side], **_shape(m))["times"]["alone"]


def _shape(m: dict) -> dict:
    return {"batch": m["batch"], "prompt_len": m["prompt_len"], "new_tokens": m["new_tokens"], "reps": m["reps"],
            "warmup": m["warmup"]}


def _figures(prefix: str, ratios: dict) -> dict:
    """Table figures of ``ratios`` ({stage: summary}); the per-repetition ratios go under ``speed_ratios``."""
    out = {"speed_ratios": {}}
    for stage in ("prefill", "decode"):
        r = ratios[stage]
        out.update({f"{prefix}{stage}_speedup": r["speedup"], f"{prefix}{stage}_speedup_lo": r["speedup_lo"],
                    f"{prefix}{stage}_speedup_hi": r["speedup_hi"]})
        out["speed_ratios"][f"{prefix}{stage}"] = r["ratios"]
    return out


def _merge(out: dict, figures: dict) -> None:
    ratios = figures.pop("speed_ratios")
    out.update(figures)
    out.setdefault("speed_ratios", {}).update(ratios)


def _rates(prefix: str, speed: dict) -> dict:
    out = {}
    for stage in ("prefill", "decode"):
        s = speed[stage]
        out.update({f"{prefix}{stage}_tokens_per_s": s["tokens_per_s"]})
        if not prefix:
            out.update({f"{stage}_tokens_per_s_{k}": s[f"tokens_per_s_{k}"] for k in ("p90", "p10", "min", "max")})
    return out


def measure_speed(variant: Applied, m: dict, pairing: str, reference_model=None, before: dict | None = None) -> dict:
    """The cell's speed figures: the variant's rates, the reference's, and the paired ratios.

    ``pairing`` from `plan_pairing`; ``reference_model`` for ``interleaved``; ``before``: the
    reference's times from `time_alone` for ``sequential``.
    """
    shape = _shape(m)
    out = {"speed_pairing": pairing, "speed_kernel": variant_kernel(variant.model)}
    if pairing == "interleaved":
        v, r, extra = sides(variant, reference_model)
        got = paired_speed([r, v, *extra], **shape)
        out.update(_rates("", got["variant"]), **_rates("ref_", got["reference"]))
        _merge(out, _figures("", got["ratios"]["variant"]))
        if "reference_default_kernel" in got:
            out["ref_kernel_default"] = variant_kernel(reference_model)
            _merge(out, _figures("default_kernel_", _vs(got, "reference_default_kernel", "variant")))
        if "variant_no_skip" in got:
            _merge(out, _figures("skip_", _vs(got, "variant_no_skip", "variant")))
        return out
    got = paired_speed([Side("variant", variant)], **shape)
    out.update(_rates("", got["variant"]))
    if pairing == "self":
        out.update({f"{s}_speedup{q}": 1.0 for s in ("prefill", "decode") for q in ("", "_lo", "_hi")})
    elif pairing == "sequential" and before is not None:
        tokens = {"prefill": m["batch"] * m["prompt_len"], "decode": m["batch"]}
        out.update(_rates("ref_", {k: summary(before[k], tokens[k]) for k in ("prefill", "decode")}))
        _merge(out, _figures("", {k: cross_ratio_summary(before[k], got["times"]["variant"][k])
                                  for k in ("prefill", "decode")}))
    return out


def _vs(got: dict, reference: str, variant: str) -> dict:
    """Ratios of ``reference``'s times over ``variant``'s, per stage (paired repetitions)."""
    return {k: ratio_summary(got["times"][reference][k], got["times"][variant][k]) for k in ("prefill", "decode")}


def release(model) -> None:
    """Free a reference model's memory (CUDA cache included)."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
