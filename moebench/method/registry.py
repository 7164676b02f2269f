"""The method plugin interface: a registry, budgets, and turning scores into kept sets.

A method is registered by decorator. Small ideas are small: a *score method* is a function
``(ctx, layer) -> scores [E]`` (higher = keep) and the registry keeps the best experts of each layer
under the budget. Methods with real machinery register a *planner* ``(ctx) -> {layer: kept ids}``
(or a full `Plan`). Either way the function's keyword-only arguments, with annotations and
defaults, are the method's scalar parameters; values from the command line are parsed and
checked against them. Third-party packages add methods through the entry-point group
``moebench.methods`` (each entry point names a module that registers on import).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import torch

from moebench.moe.view import MoEError, MoELayer, MoEView
from moebench.util import did_you_mean

KINDS = ("prune", "skip", "select", "merge")
STAT_GROUPS = ("routing", "norms", "logits", "outputs", "router_gram", "expert_means", "routed_moments")


@dataclass(frozen=True)
class Param:
    """One scalar parameter of a method: its type, default, allowed range or choices.

    A parameter annotated ``Literal["a", "b"]`` takes only those values (``choices``).
    """

    name: str
    type: type
    default: object
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None

    def describe(self) -> str:
        """``name=default`` with the choices or range, for listings (``search=auto (auto|beam)``)."""
        text = f"{self.name}={self.default!r}"
        if self.choices:
            return f"{text} ({'|'.join(map(str, self.choices))})"
        return text

    def parse(self, value, method: str):
        """``value`` (possibly a string from the command line) converted and checked."""
        if self.choices is not None:
            value = value.strip() if isinstance(value, str) else value
            if value not in self.choices:
                raise ValueError(f"{method}: parameter {self.name}={value!r} must be one of "
                                 f"{', '.join(map(repr, self.choices))}{did_you_mean(str(value), self.choices)}")
            return value
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{method}: parameter {self.name}={value!r} is not a {self.type.__name__}") from None
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"{method}: parameter {self.name}={value} is outside [{self.low}, {self.high}]")
        return value


@dataclass
class MethodSpec:
    """A registered method: name, kind, statistics it needs, parameters, paper, and its function."""

    name: str
    kind: str
    needs: tuple[str, ...]
    paper: str
    fn: Callable
    params: dict[str, Param]
    scoring: bool
    module: str
    doc: str = ""
    global_budget: bool = False  # per-layer counts may differ; only the total follows the budget
    takes_budget: bool = True  # False only for the identity method `none` (the unpruned model)
    extra_needs: Callable[[dict], tuple[str, ...]] | None = None  # groups that depend on a parameter
    source: str = ""  # how the implementation relates to the published method (authors' code, ours, ...)
    # whether planning reads the expert weights (a bool, or params -> bool), which a layer-by-layer
    # (--sequential) skeleton does not hold
    reads_weights: bool | Callable[[dict], bool] = False
    # whether planning runs the routers (NAEE re-routes cached inputs): on a layer-by-layer skeleton the
    # routers are then read from the checkpoint for the planning (`moebench.moe.layered.LayeredCheckpoint.routers`)
    runs_routers: bool = False
    # why the method cannot run layer by layer (--sequential) although it reads no weights (MoNE: its checkpoint
    # is written from the model in memory); None: it can
    sequential: str | None = None
    # why only moebench can run the method's checkpoint (MoNE: constant experts beside the kept ones); None: a plain
    # checkpoint of the family that other engines (vLLM) read
    moebench_only: str | None = None

    def needs_for(self, params: dict | None = None) -> tuple[str, ...]:
        """The statistic groups this method needs with ``params`` (parsed or raw; defaults filled in)."""
        if self.extra_needs is None:
            return self.needs
        extra = self.extra_needs(self.parse_params(params))
        return tuple(dict.fromkeys((*self.needs, *extra)))

    def reads_weights_for(self, params: dict | None = None) -> bool:
        """Whether planning with ``params`` reads the expert weights (then --sequential cannot plan it)."""
        if callable(self.reads_weights):
            return bool(self.reads_weights(self.parse_params(params)))
        return self.reads_weights

    def check_sequential(self, params: dict | None = None) -> None:
        """Refuse, naming the way out, a method that cannot plan on a layer-by-layer skeleton."""
        if self.reads_weights_for(params):
            raise ValueError(sequential_refusal(self.name))
        if self.sequential:
            raise ValueError(f"method {self.name}: {self.sequential}; use --no-sequential (lm-eval: sequential=false) "
                             "where the model fits")

    @property
    def is_identity(self) -> bool:
        """Whether this is the method that changes nothing (`none`)."""
        return not self.takes_budget

    def parse_params(self, given: dict | None) -> dict:
        """All parameters with defaults filled in; unknown names raise with a suggestion."""
        given = dict(given or {})
        for name in given:
            if name not in self.params:
                raise ValueError(f"method {self.name} has no parameter {name!r}"
                                 f"{did_you_mean(name, self.params)}; its parameters: {sorted(self.params) or 'none'}")
        return {n: p.parse(given[n], self.name) if n in given else p.default for n, p in self.params.items()}


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def _params_of(fn: Callable, bounds: dict) -> dict[str, Param]:
    """The keyword-only parameters of ``fn`` (``Literal[...]`` annotations become choices)."""
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that cannot be evaluated: fall back to the defaults' types
        hints = {}
    params = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not p.KEYWORD_ONLY:
            continue
        if p.default is p.empty:
            raise TypeError(f"{fn.__name__}: parameter {p.name} needs a default")
        hint = hints.get(p.name)
        choices = tuple(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal else None
        if choices is not None and p.default not in choices:
            raise TypeError(f"{fn.__name__}: default {p.name}={p.default!r} is not one of its choices {choices}")
        ptype = hint if isinstance(hint, type) else type(p.default)
        # a seed is a whole number >= 0 wherever it is given (a study refuses a negative one too)
        low, high = bounds.get(p.name, (0, None) if p.name == "seed" else (None, None))
        params[p.name] = Param(p.name, ptype, p.default, low, high, choices)
    return params


def sequential_refusal(name: str) -> str:
    """Why method ``name`` cannot run under --sequential, and what to do instead."""
    return (f"method {name} reads the expert weights while planning, which --sequential does not hold in "
            "memory; use a method that plans from calibration statistics (moebench methods), or --no-sequential "
            "(lm-eval: sequential=false) where the model fits")


def _register(name, kind, needs, paper, bounds, scoring, global_budget=False, takes_budget=True, extra_needs=None,
              source="", reads_weights=False, runs_routers=False, sequential=None, moebench_only=None):
    if kind not in KINDS:
        raise ValueError(f"method {name}: kind {kind!r} is not one of {KINDS}")
    needs = tuple(needs)
    bad = set(needs) - set(STAT_GROUPS)
    if bad:
        raise ValueError(f"method {name}: unknown statistic groups {sorted(bad)}; known: {STAT_GROUPS}")

    def decorate(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].module}")
        _REGISTRY[name] = MethodSpec(name, kind, needs, paper, fn, _params_of(fn, bounds or {}), scoring,
                                     fn.__module__, inspect.getdoc(fn) or "", global_budget, takes_budget,
                                     extra_needs, source, reads_weights, runs_routers, sequential, moebench_only)
        return fn

    return decorate


def score_method(name: str, *, needs=(), paper: str, bounds: dict | None = None, extra_needs=None, source: str = "",
                 reads_weights=False):
    """Register ``fn(ctx, layer, *, params) -> scores [E]``; the best experts of each layer are kept.

    ``needs``: the statistic groups; ``extra_needs(params) -> groups``: more groups where they
    depend on a parameter; ``source``: one line on what the implementation follows (the authors'
    code, the paper, a reconstruction) and which choices are moebench's own; ``reads_weights``
    (bool, or params -> bool): planning reads the expert weights, so --sequential refuses it up front.
    """
    return _register(name, "prune", needs, paper, bounds, scoring=True, extra_needs=extra_needs, source=source,
                     reads_weights=reads_weights)


def planner(name: str, *, kind: str = "prune", needs=(), paper: str, bounds: dict | None = None,
            global_budget: bool = False, takes_budget: bool = True, extra_needs=None, source: str = "",
            reads_weights=False, runs_routers: bool = False, sequential: str | None = None,
            moebench_only: str | None = None):
    """Register ``fn(ctx, *, params) -> {layer: kept ids}`` or a `Plan`, for methods with machinery.

    ``global_budget``: the method redistributes the total budget across layers. ``takes_budget``:
    False only for the identity method (`none`), which takes no ratio or keep. ``runs_routers``:
    planning runs the routers (on a layer-by-layer skeleton they are read from the checkpoint
    first). ``sequential``: why the method cannot run layer by layer although it reads no weights (refused
    up front). ``moebench_only``: why only moebench can run the method's checkpoint (another engine, such as
    vLLM, is refused up front). ``needs``, ``extra_needs``, ``source`` and ``reads_weights`` as for `score_method`.
    """
    return _register(name, kind, needs, paper, bounds, scoring=False, global_budget=global_budget,
                     takes_budget=takes_budget, extra_needs=extra_needs, source=source, reads_weights=reads_weights,
                     runs_routers=runs_routers, sequential=sequential, moebench_only=moebench_only)


def load_methods() -> dict[str, MethodSpec]:
    """Import every module in ``moebench.methods`` and every ``moebench.methods`` entry point."""
    global _LOADED
    if not _LOADED:
        pkg = importlib.import_module("moebench.methods")  # plugins are found by name, like entry points
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
        for ep in entry_points(group="moebench.methods"):
            importlib.import_module(ep.value.split(":")[0])
        _LOADED = True
    return dict(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; unknown names raise with a "did you mean"."""
    methods = load_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, methods)}; known: {', '.join(sorted(methods))}")
    return methods[name]


@dataclass
class PlanContext:
    """What a method sees: the model's MoE view, statistics, budget, seed."""

    view: MoEView
    stats: dict[int, dict[str, torch.Tensor]]
    budget: dict[int, int]  # kept experts per MoE layer
    seed: int = 0
    ratio: float | None = None
    extra: dict = field(default_factory=dict)

    def keep_best(self, layer: MoELayer, scores: torch.Tensor, n_keep: int | None = None) -> list[int]:
        """The ``n_keep`` best-scoring experts of ``layer`` (equal numbers per routing group)."""
        return select_top(scores, self.budget[layer.index] if n_keep is None else n_keep, layer.groups)


def select_top(scores: torch.Tensor, n_keep: int, groups: tuple[int, int] | None = None) -> list[int]:
    """Ids of the ``n_keep`` highest ``scores [E]`` (ties: lower id first); per group if ``groups``."""
    scores = scores.double().cpu()
    n = scores.numel()
    n_group = groups[0] if groups else 1
    size, per = n // n_group, n_keep // n_group
    kept = []
    for g in range(n_group):
        order = torch.sort(-scores[g * size:(g + 1) * size], stable=True).indices[:per]
        kept += (order + g * size).tolist()
    return sorted(kept)


def resolve_budget(view: MoEView, ratio: float | None = None, keep: int | None = None) -> dict[int, int]:
    """Kept experts per MoE layer from ``ratio`` (fraction of routed experts removed) or ``keep``.

    A ratio is rounded to whole experts, and with group-limited routing to a multiple of the group
    count (equal drops per group; `budget_note` says how). An explicit ``keep`` is never rounded:
    one that the groups cannot split equally is an error naming the nearest valid counts. Budgets
    that leave fewer than ``top_k`` experts are errors naming the numbers; a problem shared by
    several layers is said once, with the layers it concerns.
    """
    if (ratio is None) == (keep is None):
        raise ValueError("give exactly one of ratio (fraction of experts removed) or keep (experts kept per layer)")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio} must be in [0, 1): the fraction of routed experts removed")
    budget, problems = {}, {}
    for layer in view.layers:
        budget[layer.index], problem = _layer_budget(layer, ratio, keep)
        if problem:
            problems.setdefault(problem, []).append(layer.index)
    if problems:
        n = len(view.layers)
        lines = [f"{text} ({_which_layers(layers, n)})" for text, layers in problems.items()]
        raise MoEError("impossible budget:\n  " + "\n  ".join(lines[:8]))
    return budget


def _layer_budget(layer: MoELayer, ratio: float | None, keep: int | None) -> tuple[int, str | None]:
    """One layer's kept count and what is wrong with it (None when it works)."""
    n, groups = layer.num_experts, layer.groups[0] if layer.groups else None
    if keep is not None:
        kept = int(keep)
        if groups and kept % groups:
            near = [c for c in (kept - kept % groups, kept - kept % groups + groups)
                    if max(groups, layer.top_k) <= c <= n]
            fix = " or ".join(f"keep={c}" for c in near) or f"a multiple of {groups} from {layer.top_k} to {n}"
            return kept, (f"keep={kept} cannot be split equally over the router's {groups} expert groups "
                          f"(group-limited routing needs equal drops per group): use {fix}")
    else:
        kept = n - round(ratio * n)
        if groups:
            kept = max(groups, round(kept / groups) * groups)
    if kept > n:
        return kept, f"keep={kept} exceeds the {n} experts of the layer"
    if kept < layer.top_k:
        requested = f"ratio={ratio:g}" if ratio is not None else f"keep={kept}"
        return kept, (f"{requested} leaves {kept} experts but the router selects top_k={layer.top_k}; "
                      f"use ratio <= {(n - layer.top_k) / n:.3f} or keep >= {layer.top_k}")
    return kept, None


def _which_layers(layers: list[int], n_layers: int) -> str:
    if len(layers) == n_layers and n_layers > 1:
        return f"all {n_layers} MoE layers"
    return f"MoE layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))} of {n_layers}"


def realised_ratio(view: MoEView, kept: dict[int, int]) -> float:
    """The fraction of the model's routed experts that ``kept`` (MoE layer -> count) removes."""
    total = sum(layer.num_experts for layer in view.layers)
    return 1.0 - sum(kept.get(layer.index, layer.num_experts) for layer in view.layers) / total


def budget_note(view: MoEView, ratio: float | None, budget: dict[int, int]) -> str | None:
    """How ``ratio`` was rounded to whole experts (and routing groups), or None when it was not."""
    if ratio is None:
        return None
    realised = realised_ratio(view, budget)
    if abs(realised - ratio) < 1e-9:
        return None
    counts = sorted({(layer.num_experts, budget[layer.index]) for layer in view.layers})
    grouped = " and equal drops per routing group" if any(layer.groups for layer in view.layers) else ""
    kept = ", ".join(f"{k} of {n}" for n, k in counts)
    return (f"ratio={ratio:g} is rounded to whole experts{grouped}: {kept} experts kept per MoE layer, "
            f"a realised ratio of {realised:.4g}")
