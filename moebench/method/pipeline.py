"""From a model and a request to a Plan in effect: budget, cached statistics, the method, apply.

``prepare`` (= ``make_plan`` + `moebench.method.apply.apply` + skipping thresholds measured on the
model as applied) is the one path every front end uses: ``moebench prune``, the lm-eval model and
grid cells.
"""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

from moebench.calib.cache import cache_dir, default_stats_dir, get_stats, model_key
from moebench.calib.stats import CollectSettings
from moebench.method.apply import Applied, apply
from moebench.method.plan import Plan
from moebench.method.registry import (
    MethodSpec,
    PlanContext,
    budget_note,
    get_method,
    realised_ratio,
    resolve_budget,
)
from moebench.moe.layered import LAYERED_ATTR
from moebench.moe.merge import validate_merge
from moebench.moe.ops import validate_keep
from moebench.moe.skipping import naee_betas
from moebench.moe.view import MoEView

log = logging.getLogger(__name__)

SKIP_RULES = ("none", "naee")  # dynamic expert skipping rules (Lu et al. 2024)

# How the command line spells a request's fields where its flag is not ``--<field with dashes>``.
CLI_FLAGS = {"calib_samples": "--samples", "calib_seq_len": "--seq-len"}


@dataclass
class PlanRequest:
    """Everything that decides a plan, as plain values (what a user types)."""

    method: str
    ratio: float | None = None
    keep: int | None = None
    calib: str | None = None
    calib_samples: int = 128
    calib_seq_len: int = 2048
    seed: int = 0
    params: dict = field(default_factory=dict)
    stats_dir: str | None = None
    model_id: str | None = None
    revision: str | None = None
    skip: str = "none"
    skip_beta: float | None = None
    subsample_tokens: int | None = None  # statistics settings; None: `CollectSettings`' default
    ratio_samples: int | None = None
    front_end: str = "model_args"  # how error messages spell arguments: "model_args" (lm-eval) or "cli"

    def collect_settings(self) -> CollectSettings:
        """The statistics pass settings of this request (part of the cache key)."""
        given = {"subsample_tokens": self.subsample_tokens, "ratio_samples": self.ratio_samples}
        return CollectSettings(seed=self.seed, **{k: v for k, v in given.items() if v is not None})

    def spell(self, **pairs) -> str:
        """Arguments as the user's front end writes them: ``calib=c4,ratio=0.5`` or ``--calib c4 --ratio 0.5``."""
        if self.front_end == "cli":
            return " ".join(f"{CLI_FLAGS.get(k, '--' + k.replace('_', '-'))} {v}" for k, v in pairs.items())
        return ",".join(f"{k}={v}" for k, v in pairs.items())

    @property
    def spec(self) -> MethodSpec:
        """The requested method's registration."""
        return get_method(self.method)

    def needs(self) -> tuple[str, ...]:
        """Statistic groups this request calibrates: the method's, plus routing for measured skip thresholds."""
        groups = self.spec.needs_for(self.params)
        if self.skip != "none" and self.skip_beta is None:
            groups = tuple(dict.fromkeys((*groups, "routing")))
        return groups


def calibration_for(request: PlanRequest):
    """The `Calibration` of a request (None when it names none)."""
    if request.calib is None:
        return None
    from moebench.calib.sources import parse_calibration

    return parse_calibration(request.calib, samples=request.calib_samples, seq_len=request.calib_seq_len,
                             seed=request.seed)


def single_requests(request: PlanRequest) -> list[PlanRequest]:
    """One request per calibration source of a multi-source spec (``testbed:domains``, ``a+b``)."""
    from moebench.calib.sources import calibration_sources

    return [replace(request, calib=source) for source in calibration_sources(request.calib)]


def calib_key(request: PlanRequest, kind: str = "prune") -> str | None:
    """The calibration key of a request: ``a-...+b-...`` for the several sources of a select method."""
    if request.calib is None:
        return None
    if kind != "select":
        return calibration_for(request).key
    return "+".join(calibration_for(r).key for r in single_requests(request))


def statistics(model, tokenizer, request: PlanRequest, groups, progress: bool = True):
    """Cached statistics of ``groups`` for the request's model and calibration set."""
    calib = calibration_for(request)
    if calib is None:
        raise ValueError(f"method {request.method} needs calibration statistics ({', '.join(groups)}); "
                         f"give a calibration source, e.g. {request.spell(calib='c4')} or "
                         f"{request.spell(calib='testbed:mix')}")
    settings = request.collect_settings()
    folder = cache_dir(request.stats_dir or default_stats_dir(),
                       model_key(model, request.model_id, request.revision), calib.key, settings)
    layered = getattr(model, LAYERED_ATTR, None)  # a skeleton opened layer by layer: its parameters are meta
    device = layered.device if layered is not None else next(model.parameters()).device
    collected = []

    def tokens():
        collected.append(True)
        return calib.tokens(tokenizer).to(device)

    stats = get_stats(model, tokens, groups, folder, settings, progress)
    if progress:  # the command line says where the statistics are, and whether they were there already
        how = "collected and cached in" if collected else "read from the cache"
        print(f"statistics ({', '.join(sorted(groups))}) of {calib.key}: {how} {folder}", file=sys.stderr)
    return stats


def make_plan(model, tokenizer, request: PlanRequest, progress: bool = True) -> Plan:
    """Decide which experts to keep: the method's plan under the request's budget."""
    spec = request.spec
    params = spec.parse_params(request.params)
    if spec.is_identity:  # the unpruned model: no budget, no statistics, any model (MoE or not)
        if request.keep is not None or request.ratio:
            raise ValueError(f"method {spec.name} keeps every expert and takes no budget (ratio/keep); choose a "
                             f"method, e.g. {request.spell(method='reap', ratio=0.5)} (moebench methods lists them)")
        return Plan(spec.name, spec.kind, params=params, ratio=request.ratio)
    needs = spec.needs_for(params)
    view = MoEView(model)
    budget = resolve_budget(view, ratio=request.ratio, keep=request.keep)
    extra = {}
    if spec.kind == "select" and needs:  # one statistics set per task / domain, each cached alone
        domains = {r.calib: statistics(model, tokenizer, r, needs, progress) for r in single_requests(request)}
        stats, extra["domain_stats"] = next(iter(domains.values())), domains
    else:
        stats = statistics(model, tokenizer, request, needs, progress) if needs else {}
    if request.calib is not None and spec.kind != "select":  # token ids [S, L], read only by methods that run
        extra["calibration_tokens"] = lambda: calibration_for(request).tokens(tokenizer)  # the model (EvoESAP)
    layered = getattr(model, LAYERED_ATTR, None)  # a skeleton: routers a method runs are read for the planning
    with layered.routers() if layered is not None and spec.runs_routers else nullcontext():
        plan = plan_from_stats(view, spec.name, params, budget, stats, seed=request.seed, ratio=request.ratio,
                               extra=extra)
    plan.calib = calib_key(request, spec.kind) if needs else None
    note = budget_note(view, request.ratio, budget)
    if note:  # said once per plan, and kept with it (plan.json, the lm-eval record, cell.json)
        log.warning("%s: %s", spec.name, note)
        plan.extra["budget_note"] = note
    if request.ratio is not None and spec.kind != "select":
        plan.extra["ratio_realised"] = round(realised_ratio(view, plan.experts_kept()), 6)
    return plan


def skip_betas(model, tokenizer, request: PlanRequest, progress: bool = True) -> dict[int, float]:
    """Per-layer skipping thresholds: ``skip_beta`` for every layer, or measured on the model as it is now.

    Measured thresholds (NAEE's beta_l, the median second/first gate ratio on the calibration set)
    come from the routing statistics of the model that will run, after pruning, as the paper pairs
    r=6 pruning with skipping; they are cached like any other statistics.
    """
    if request.skip not in SKIP_RULES:
        raise ValueError(f"{request.spell(skip=request.skip)}: choose one of {', '.join(SKIP_RULES)}")
    view = MoEView(model)
    if request.skip_beta is not None:  # a fixed threshold for every layer (0 skips nothing)
        return {index: float(request.skip_beta) for index in view.indices}
    return naee_betas(statistics(model, tokenizer, request, ["routing"], progress))


def prepare(model, tokenizer, request: PlanRequest, mode: str = "physical", offload=False,
            progress: bool = True) -> Applied:
    """Make the request's plan, apply it to ``model`` (in place), switch on skipping if asked.

    The returned `Applied` holds the complete plan (kept sets, skip thresholds, selector state).
    """
    plan = make_plan(model, tokenizer, request, progress)
    applied = apply(model, plan, mode, offload)
    if request.skip != "none":
        applied.enable_skip(skip_betas(model, tokenizer, request, progress), request.skip)
    return applied


def plan_from_stats(view: MoEView, method: str, params: dict, budget: dict[int, int], stats: dict,
                    seed: int = 0, ratio: float | None = None, extra: dict | None = None) -> Plan:
    """Run a method on ready statistics; the kept sets are validated against the model.

    ``extra`` reaches the method as ``ctx.extra`` (select methods: ``domain_stats``, source -> stats;
    ``calibration_tokens``: the calibration token ids ``[S, L]``, or a callable returning them, for
    methods that run the model on calibration text).
    """
    spec = get_method(method)
    params = spec.parse_params(params)
    ctx = PlanContext(view, stats, budget, seed=seed, ratio=ratio, extra=dict(extra or {}))
    if spec.scoring:
        result = {layer.index: ctx.keep_best(layer, spec.fn(ctx, layer, **params)) for layer in view.layers}
    else:
        result = spec.fn(ctx, **params)
    plan = result if isinstance(result, Plan) else Plan(spec.name, spec.kind, keep=result)
    plan.method, plan.kind, plan.params, plan.ratio = spec.name, spec.kind, params, ratio
    if plan.kind == "merge":  # the kept experts are the groups' `into` experts
        plan.merge, plan.keep = validate_merge(view, plan.merge or {}, plan.expert_map)
    if plan.novice is not None:  # MoNE: the router is unchanged, so no equal drops per routing group are needed
        from moebench.moe.novice import validate_novices

        plan.keep, plan.novice = validate_novices(view, plan.keep, plan.novice)
    else:
        plan.keep = validate_keep(view, plan.keep)
    return plan
