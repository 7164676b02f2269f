"""The model_args of lm-eval's ``pruned_moe``: which are the ``hf`` model's, pruned_moe's own or the method's.

A key that is none of these is an error with a "did you mean": HFLM would otherwise pass it
silently to ``from_pretrained``. Values arrive as lm-eval parses them (``none`` becomes None,
numbers become int or float) or as Python values from ``simple_evaluate``.
"""

from __future__ import annotations

import inspect

from moebench.calib.sources import calibration_sources, parse_calibration
from moebench.method.registry import get_method
from moebench.util import did_you_mean

# pruned_moe's own model_args and their defaults.
OWN_ARGS = {"method": "none", "ratio": None, "keep": None, "calib": None, "calib_samples": 128,
            "calib_seq_len": None, "seed": 0, "stats_dir": None, "apply": "physical", "skip": "none",
            "skip_beta": None, "offload": False}
APPLY_MODES = ("physical", "mask")
SKIP_RULES = ("none", "naee")  # dynamic expert skipping rules (see PrunedMoELM._apply_skip)

# from_pretrained keywords that HFLM forwards through **kwargs, besides from_pretrained's named ones.
FORWARDED_LOAD_ARGS = frozenset({
    "attn_implementation", "experts_implementation", "device_map", "max_memory", "offload_buffers",
    "quantization_config", "variant", "key_mapping", "use_kernels", "tp_size", "torch_dtype",
    "low_cpu_mem_usage", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type",
    "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant"})

# model_args that change how a run executes, not what it computes: not part of the variant identity.
EXECUTION_ARGS = frozenset({
    "batch_size", "max_batch_size", "device", "parallelize", "device_map", "max_memory_per_gpu",
    "max_cpu_memory", "max_memory", "offload_folder", "offload_buffers", "tp_plan", "tp_size",
    "trust_remote_code", "logits_cache", "stats_dir", "low_cpu_mem_usage"})


def hf_arg_names() -> set[str]:
    """Every model_arg the ``hf`` model accepts: HFLM's parameters and the loading keywords it forwards."""
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel

    named = {p.name for p in inspect.signature(HFLM.__init__).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    loading = {p.name for p in inspect.signature(PreTrainedModel.from_pretrained).parameters.values()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return (named | loading | FORWARDED_LOAD_ARGS) - {"self", "pretrained_model_name_or_path", "config"}


def split_model_args(given: dict) -> tuple[dict, dict, dict]:
    """``(hf args, pruned_moe's own args, method parameters)``; an unknown key raises with a suggestion.

    ``seed`` is pruned_moe's (calibration order) and also sets the method's own ``seed`` if it has one.
    """
    method = _method_name(given.get("method"))
    method_params = set(get_method(method).params) if method != "none" else set()
    hf_names = hf_arg_names()
    hf, own, params, unknown = {}, {}, {}, []
    for key, value in given.items():
        if key in OWN_ARGS:
            own[key] = value
            if key in method_params:
                params[key] = value
        elif key in hf_names:
            hf[key] = value
        elif key in method_params:
            params[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(_unknown_message(unknown, method, method_params, hf_names))
    return hf, own, params


def _method_name(value) -> str:
    """lm-eval turns ``method=none`` into None; both mean no method."""
    return "none" if value is None or str(value).strip().lower() == "none" else str(value).strip()


def _unknown_message(unknown: list[str], method: str, method_params: set[str], hf_names: set[str]) -> str:
    known = sorted(hf_names | set(OWN_ARGS) | method_params)
    hints = []
    for key in unknown:
        hints.append(f"{key!r}{did_you_mean(key, known)}")
    where = f"method {method}: {', '.join(sorted(method_params)) or 'none'}" if method != "none" else "no method chosen"
    return (f"pruned_moe: unknown model_args {', '.join(hints)}. pruned_moe takes the hf model's arguments "
            f"(pretrained, revision, dtype, batch_size, device, parallelize, device_map, ...), its own "
            f"({', '.join(OWN_ARGS)}) and the chosen method's parameters ({where})")


def _optional(value, kind):
    return None if value is None or (isinstance(value, str) and value.strip().lower() == "none") else kind(value)


def check_own_args(own: dict) -> dict:
    """pruned_moe's own arguments converted and checked (everything that needs no statistics)."""
    args = {**OWN_ARGS, **own}
    method = _method_name(args["method"])
    ratio, keep = _optional(args["ratio"], float), _optional(args["keep"], int)
    apply = str(args["apply"]).strip().lower()
    skip = "none" if args["skip"] is None else str(args["skip"]).strip().lower()
    if skip not in SKIP_RULES:
        raise ValueError(f"skip={skip}: choose skip=none or skip=naee (Lu et al. 2024 dynamic skipping)")
    skip_beta = _optional(args["skip_beta"], float)
    if skip_beta is not None and (skip == "none" or not 0.0 <= skip_beta <= 1.0):
        raise ValueError(f"skip_beta={skip_beta}: give it with skip=naee, in [0, 1] (0 skips nothing)")
    if skip != "none" and skip_beta is None and _optional(args["calib"], str) is None:
        raise ValueError(f"skip={skip} estimates its thresholds on calibration data: give calib=..., e.g. calib=c4")
    if apply not in APPLY_MODES:
        raise ValueError(f"apply={apply}: choose apply=physical (remove the experts) or apply=mask (route around them)")
    if method == "none" and (ratio is not None or keep is not None):
        raise ValueError("ratio/keep need a method, e.g. method=reap,ratio=0.5 (moebench methods lists them)")
    if method != "none":
        _check_method(method, ratio, keep, args)
    return {"method": method, "ratio": ratio, "keep": keep, "apply": apply, "skip": skip, "skip_beta": skip_beta,
            "calib": _optional(args["calib"], str), "calib_samples": int(args["calib_samples"]),
            "calib_seq_len": _optional(args["calib_seq_len"], int), "seed": int(args["seed"]),
            "stats_dir": _optional(args["stats_dir"], str), "offload": _offload(args["offload"], method)}


def _offload(value, method: str) -> bool:
    """``offload=true``: experts in CPU memory, streamed per request (select methods only)."""
    on = str(value).strip().lower() in ("1", "true", "yes")
    if on and (method == "none" or get_method(method).kind != "select"):
        raise ValueError(f"offload=true streams the experts each request selects: it needs a select method "
                         f"(premoe_taer, prep), not {method}")
    return on


def _check_method(method: str, ratio: float | None, keep: int | None, args: dict) -> None:
    """The method's kind, the budget and (for methods that need statistics) the calibration source."""
    spec = get_method(method)
    if spec.kind not in ("prune", "select"):
        raise ValueError(f"method {method} is a {spec.kind} method; pruned_moe applies prune and select methods")
    if (ratio is None) == (keep is None):
        raise ValueError(f"method={method} needs exactly one budget: ratio (fraction of routed experts "
                         "removed, e.g. ratio=0.5) or keep (experts kept per MoE layer)")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio} must be in [0, 1): the fraction of routed experts removed")
    if not spec.needs:
        return
    if _optional(args["calib"], str) is None:
        raise ValueError(f"method {method} needs calibration statistics ({', '.join(spec.needs)}); "
                         "give a calibration source, e.g. calib=c4 or calib=testbed:mix")
    # An unknown source fails now, before the model is loaded.
    sources = calibration_sources(str(args["calib"])) if spec.kind == "select" else [str(args["calib"])]
    for source in sources:
        parse_calibration(source, int(args["calib_samples"]), _optional(args["calib_seq_len"], int) or 1,
                          int(args["seed"]))
