"""The model_args of lm-eval's ``pruned_moe``: which are the ``hf`` model's, pruned_moe's own or the method's.

A key that is none of these is an error with a "did you mean": HFLM would otherwise pass it
silently to ``from_pretrained``. Values arrive as lm-eval parses them (``none`` becomes None,
numbers become int or float) or as Python values from ``simple_evaluate``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from moebench.calib.sources import calibration_size_problem, calibration_sources, parse_calibration
from moebench.method.pipeline import SKIP_RULES, PlanRequest
from moebench.method.recover import RecoverSpec
from moebench.method.registry import MethodSpec, get_method
from moebench.util import did_you_mean

# pruned_moe's own model_args and their defaults.
RECOVER_KEYS = ("data", "steps", "lr", "rank", "alpha", "expert_rank", "batch", "seq_len", "warmup", "seed", "kd_top")
OWN_ARGS = {"method": "none", "ratio": None, "keep": None, "calib": None, "calib_samples": 128,
            "calib_seq_len": None, "seed": 0, "stats_dir": None, "apply": "physical", "skip": "none",
            "skip_beta": None, "offload": False, "subsample_tokens": None, "ratio_samples": None,
            "sequential": False, "save_dtype": None, "recover": None,
            **{f"recover_{name}": None for name in RECOVER_KEYS}}
APPLY_MODES = ("physical", "mask")

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


def repeated_keys(arg_string: str) -> str | None:
    """Why a raw ``key=value,...`` model_args string is refused: a key given twice with different values (lm-eval
    keeps the last one, so ``pretrained=M,...,pretrained=/other`` would load the other model), else None."""
    seen: dict[str, str] = {}
    for item in (arg_string or "").split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            continue
        if key in seen and seen[key] != value.strip():
            return (f"model_args: {key} is given twice ({key}={seen[key][:60]} and {key}={value.strip()[:60]}); "
                    "give each argument once")
        seen[key] = value.strip()
    return None


def repeated_in_command_line(argv: list[str]) -> str | None:
    """`repeated_keys` of the ``--model_args`` / ``-a`` values on an lm-eval command line (each value, and keys
    repeated across values), or None."""
    values = []
    for i, arg in enumerate(argv):
        if arg in ("--model_args", "-a"):  # one value, or several (`-a k=v k2=v2`), up to the next option
            for value in argv[i + 1:]:
                if value.startswith("-"):
                    break
                values.append(value)
        elif arg.startswith("--model_args="):
            values.append(arg.split("=", 1)[1])
    return repeated_keys(",".join(values)) if values else None


def split_model_args(given: dict) -> tuple[dict, dict, dict]:
    """``(hf args, pruned_moe's own args, method parameters)``; an unknown key raises with a suggestion.

    ``seed`` is pruned_moe's (calibration order) and also sets the method's own ``seed`` if it has one.
    """
    method = _method_name(given.get("method"))
    method_params = set(get_method(method).params)
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
    where = f"method {method}: {', '.join(sorted(method_params)) or 'none'}"
    return (f"pruned_moe: unknown model_args {', '.join(hints)}. pruned_moe takes the hf model's arguments "
            f"(pretrained, revision, dtype, batch_size, device, parallelize, device_map, ...), its own "
            f"({', '.join(OWN_ARGS)}) and the chosen method's parameters ({where})")


def _optional(value, kind):
    return None if value is None or (isinstance(value, str) and value.strip().lower() == "none") else kind(value)


def _whole(value, name: str):
    """A whole number from a model_arg (``"16"`` or 16); anything else raises naming the argument."""
    if value is None or isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a whole number") from None
    if number != int(number):
        raise ValueError(f"{name}={value!r} must be a whole number")
    return int(number)


def _flag(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _recover(args: dict) -> RecoverSpec | None:
    """The recovery stage from ``recover=<kind>`` and its ``recover_<setting>`` arguments, or None."""
    given = {name: args[f"recover_{name}"] for name in RECOVER_KEYS if args[f"recover_{name}"] is not None}
    if args["recover"] is None:
        if given:
            raise ValueError(f"recover_{next(iter(given))}=... sets up a recovery stage: give recover=lora, "
                             "router_kd or full as well")
        return None
    return RecoverSpec.parse({"kind": args["recover"], **given}, "recover")


@dataclass(frozen=True)
class PrunedMoESettings:
    """pruned_moe's own arguments, converted and checked (everything that needs no statistics).

    ``method`` is a registered method (``none``, the identity, by default); ``params`` its parsed
    parameters; ``ratio`` / ``keep`` the budget; ``calib`` ... ``stats_dir`` the calibration;
    ``apply`` physical | mask; ``skip`` / ``skip_beta`` dynamic skipping; ``offload`` for select methods;
    ``subsample_tokens`` / ``ratio_samples`` the statistics settings (None: the defaults of
    `moebench.calib.stats.CollectSettings`; 0: every calibration token). ``sequential``: calibrate
    one decoder layer at a time and write the pruned checkpoint shard by shard before lm-eval loads
    it (the unpruned model is never loaded whole; the pruned one must fit for the evaluation), in the
    source's format or, with ``save_dtype`` (bf16, fp16, fp32), dequantized / cast.
    """

    method: str = "none"
    params: dict = field(default_factory=dict)
    ratio: float | None = None
    keep: int | None = None
    calib: str | None = None
    calib_samples: int = 128
    calib_seq_len: int | None = None
    seed: int = 0
    stats_dir: str | None = None
    apply: str = "physical"
    skip: str = "none"
    skip_beta: float | None = None
    offload: bool = False
    subsample_tokens: int | None = None
    ratio_samples: int | None = None
    sequential: bool = False
    save_dtype: str | None = None
    recover: RecoverSpec | None = None  # a recovery stage after the method (`moebench.method.recover`)

    @property
    def spec(self) -> MethodSpec:
        """The chosen method's registration."""
        return get_method(self.method)

    @property
    def uses_data(self) -> bool:
        """Whether calibration data are read (the method's statistics or measured skip thresholds)."""
        return bool(self.spec.needs_for(self.params)) or (self.skip != "none" and self.skip_beta is None)

    @classmethod
    def from_args(cls, own: dict, params: dict) -> PrunedMoESettings:
        """Convert and check pruned_moe's own arguments ``own`` and the method's ``params``."""
        args = {**OWN_ARGS, **own}
        method = _method_name(args["method"])
        spec = get_method(method)
        settings = cls(method=method, params=spec.parse_params(params), ratio=_optional(args["ratio"], float),
                       keep=_optional(args["keep"], int), calib=_optional(args["calib"], str),
                       calib_samples=_whole(args["calib_samples"], "calib_samples"),
                       calib_seq_len=_optional(args["calib_seq_len"], lambda v: _whole(v, "calib_seq_len")),
                       seed=_whole(args["seed"], "seed"), stats_dir=_optional(args["stats_dir"], str),
                       apply=str(args["apply"]).strip().lower(),
                       skip="none" if args["skip"] is None else str(args["skip"]).strip().lower(),
                       skip_beta=_optional(args["skip_beta"], float), offload=_flag(args["offload"]),
                       subsample_tokens=_optional(args["subsample_tokens"], int),
                       ratio_samples=_optional(args["ratio_samples"], int), sequential=_flag(args["sequential"]),
                       save_dtype=_optional(args["save_dtype"], str), recover=_recover(args))
        settings._check()
        return settings

    def _check(self) -> None:
        skip, beta = self.skip, self.skip_beta
        if skip not in SKIP_RULES:
            raise ValueError(f"skip={skip}: choose skip=none or skip=naee (Lu et al. 2024 dynamic skipping)")
        if beta is not None and (skip == "none" or not 0.0 <= beta <= 1.0):
            raise ValueError(f"skip_beta={beta}: give it with skip=naee, in [0, 1] (0 skips nothing)")
        if skip != "none" and beta is None and self.calib is None:
            raise ValueError(f"skip={skip} estimates its thresholds on calibration data: give calib=..., e.g. calib=c4")
        if self.apply not in APPLY_MODES:
            raise ValueError(f"apply={self.apply}: choose apply=physical (remove the experts) or apply=mask "
                             "(route around them)")
        spec = self.spec
        if spec.is_identity:
            if self.ratio is not None or self.keep is not None:
                raise ValueError("ratio/keep need a method, e.g. method=reap,ratio=0.5 (moebench methods lists them)")
        else:
            self._check_method(spec)
        if self.uses_data:
            self._check_calibration(spec)
        for name in ("subsample_tokens", "ratio_samples"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (tokens kept for the statistics; 0 = every token)")
        if self.sequential and (spec.is_identity or spec.kind not in ("prune", "merge") or self.apply != "physical"):
            raise ValueError(f"sequential=true writes the pruned checkpoint one layer at a time before the evaluation: "
                             f"it needs a prune or merge method with apply=physical, not method={self.method}, "
                             f"apply={self.apply}")
        if self.sequential:
            spec.check_sequential(self.params)
        if self.save_dtype is not None:
            from moebench.moe.formats import parse_save_dtype

            parse_save_dtype(self.save_dtype)
            if not self.sequential:
                raise ValueError(f"save_dtype={self.save_dtype} sets the format of the pruned checkpoint that "
                                 "sequential=true writes; without sequential=true no checkpoint is written (the model "
                                 "is loaded and pruned in memory, in dtype=...)")
        if self.recover is not None:
            from moebench.method.recover import refusal

            if spec.is_identity:
                raise ValueError("recover=... trains a pruned model: give a method and a budget, e.g. "
                                 "method=reap,ratio=0.5,calib=c4,recover=lora,recover_data=c4")
            why = refusal(spec.kind, self.skip, self.apply)
            if why:
                raise ValueError(why)
            if self.sequential:
                raise ValueError("recover=... trains the model in memory; sequential=true never holds it whole")
        if self.offload and spec.kind != "select":
            raise ValueError(f"offload=true streams the experts each request selects: it needs a select method "
                             f"(premoe_taer, prep), not {self.method}")

    def _check_method(self, spec: MethodSpec) -> None:
        """The method's kind and the budget."""
        if spec.kind not in ("prune", "select", "merge"):
            raise ValueError(f"method {self.method} is a {spec.kind} method; pruned_moe applies prune, select "
                             "and merge methods")
        if spec.kind == "merge" and self.apply != "physical":
            raise ValueError(f"method {self.method} merges experts (new expert weights), which apply=mask cannot "
                             "express: use apply=physical")
        if (self.ratio is None) == (self.keep is None):
            raise ValueError(f"method={self.method} needs exactly one budget: ratio (fraction of routed experts "
                             "removed, e.g. ratio=0.5) or keep (experts kept per MoE layer)")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must be in [0, 1): the fraction of routed experts removed")

    def _check_calibration(self, spec: MethodSpec) -> None:
        """A calibration source is given and known (fails now, before the model is loaded)."""
        needs = spec.needs_for(self.params)
        if self.calib is None:
            raise ValueError(f"method {self.method} needs calibration statistics ({', '.join(needs)}); "
                             "give a calibration source, e.g. calib=c4 or calib=testbed:mix")
        problem = calibration_size_problem(self.calib_samples, self.calib_seq_len or 2048,
                                           ("calib_samples", "calib_seq_len"))
        if problem:
            raise ValueError(problem + ("" if self.calib_seq_len else " (calib_seq_len defaults to at most 2048)"))
        sources = calibration_sources(self.calib) if spec.kind == "select" else [self.calib]
        for source in sources:
            parse_calibration(source, self.calib_samples, self.calib_seq_len or 1, self.seed)

    def request(self, model_id: str | None, revision: str | None, seq_len: int) -> PlanRequest:
        """The plan request these settings describe (``seq_len``: the calibration length to use)."""
        return PlanRequest(method=self.method, ratio=self.ratio, keep=self.keep, calib=self.calib,
                           calib_samples=self.calib_samples, calib_seq_len=seq_len, seed=self.seed,
                           params=self.params, stats_dir=self.stats_dir, model_id=model_id, revision=revision,
                           skip=self.skip, skip_beta=self.skip_beta, subsample_tokens=self.subsample_tokens,
                           ratio_samples=self.ratio_samples)
