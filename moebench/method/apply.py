"""`apply(model, plan)`: the one verb that puts a plan in effect on a model, in place.

- ``prune`` plans: experts outside ``plan.keep`` are removed (``mode="physical"``) or only never
  routed to (``mode="mask"``: the same outputs, nothing freed).
- ``select`` plans: nothing is removed; the returned `Applied` chooses kept sets per input from its
  context (`Applied.select`) and runs a batch under per-row routing masks (`Applied.batch`);
  ``offload=True`` keeps the routed experts in CPU memory and streams each layer's working set.
- ``merge`` plans: each group's experts are merged into one (weights, router rows), the others
  removed (`moebench.moe.merge`); with ``plan.expert_map`` the router keeps all its rows and each routes
  to its group's merged expert (`moebench.moe.expert_map`); ``mode="physical"`` only, since a merge
  changes weights.
- prune plans with ``plan.novice`` (MoNE): the replaced experts are removed (``mode="physical"``) or kept
  in memory (``mode="mask"``) and answer with their constant vectors, the router unchanged
  (`moebench.moe.novice`).
- ``plan.skip`` (any kind): dynamic skipping with the plan's per-layer thresholds.

`Applied` runs prompts the way every front end does (`forward`, `generate`: the per-request selection
included for select plans), which is what `moebench.measure` times. The lm-eval model, ``moebench
prune`` and grid cells all reach a model through `apply` (usually via `moebench.method.pipeline.prepare`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from moebench.method.plan import Plan
from moebench.method.select import context_signature, selector_from_plan
from moebench.moe.merge import merge
from moebench.moe.ops import mask, prune, sample_mask
from moebench.moe.skipping import enable_skipping
from moebench.moe.view import MoEError

MODES = ("physical", "mask")


@dataclass
class Applied:
    """A model with a plan in effect.

    Attributes:
        model: the model (changed in place by `apply`).
        plan: the plan in effect (``plan.skip`` is filled in when skipping is switched on).
        mode: ``physical`` or ``mask``.
        selector: the per-input selector of a select plan (None otherwise).
        offloader: the expert offloader with ``offload=True`` (select plans only).
        select_seconds: wall time of every selection made so far.
    """

    model: nn.Module
    plan: Plan
    mode: str = "physical"
    selector: object | None = None
    offloader: object | None = None
    select_seconds: list[float] = field(default_factory=list)

    @property
    def selects(self) -> bool:
        """Whether the kept experts are chosen per input (a select plan)."""
        return self.selector is not None

    def enable_skip(self, betas: dict[int, float], rule: str = "naee") -> None:
        """Switch on dynamic skipping with per-layer ``betas`` and record them in the plan."""
        self.plan.skip = {"rule": rule, "betas": {int(k): float(v) for k, v in betas.items()}}
        enable_skipping(self.model, self.plan.skip["betas"])

    def select(self, tokens) -> dict[int, list[int]]:
        """The kept sets of one context ``tokens [T]``: a signature pass over it, then the selector.

        The pass stops after the last layer the selector reads (PreMoE TAER's key: the first MoE layer, so no
        expert runs). With offloading, experts outside the working sets that the pass does run are computed
        on their CPU copies.
        """
        if not self.selects:
            raise MoEError(f"a {self.plan.kind} plan keeps the same experts for every input; nothing to select")
        start = time.perf_counter()
        with self.offloader.cpu_side_pass() if self.offloader is not None else nullcontext():
            needed = getattr(self.selector, "needed_layers", None)
            keep = self.selector.select(context_signature(self.model, list(tokens), needed))
        self.select_seconds.append(time.perf_counter() - start)
        return keep

    @contextmanager
    def batch(self, keeps: list[dict[int, list[int]]]):
        """Within the block row b of a batch routes only among ``keeps[b]`` (offload working sets follow)."""
        with self.offloader.batch(keeps) if self.offloader is not None else nullcontext(), \
                sample_mask(self.model, keeps):
            yield

    def forward(self, ids: torch.Tensor, use_cache: bool = False):
        """One forward of ``ids [B, L]`` as a front end runs it (per-row selection first for select plans)."""
        with self._selected(ids):
            return self.model(input_ids=ids, use_cache=use_cache)

    def generate(self, ids: torch.Tensor, new_tokens: int):
        """Greedy generation of exactly ``new_tokens`` after ``ids [B, L]`` (selection from the prompts)."""
        pad = self.model.config.get_text_config().pad_token_id or 0
        with self._selected(ids):
            return self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=pad)

    @contextmanager
    def _selected(self, ids: torch.Tensor):
        if not self.selects:
            with torch.no_grad():
                yield
            return
        keeps = [self.select(row.tolist()) for row in ids]
        with torch.no_grad(), self.batch(keeps):
            yield

    def close(self) -> None:
        """Give offloaded experts back to the model (no-op without offloading)."""
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None


def unchanged(model: nn.Module) -> Applied:
    """The model as it is, as an `Applied` (what the unpruned reference runs as)."""
    return Applied(model, Plan("none", "prune"))


def apply(model: nn.Module, plan: Plan, mode: str = "physical", offload=False) -> Applied:
    """Put ``plan`` in effect on ``model`` (in place) and return the `Applied` model.

    ``offload``: True to offload the experts now, or an `moebench.moe.offload.ExpertOffloader` already
    attached (a model loaded with its experts in host memory).

    Raises `MoEError` for an unknown mode, ``offload`` with a plan that is not a select plan, a merge
    plan with ``mode="mask"``, or a kind that cannot be applied.
    """
    if mode not in MODES:
        raise MoEError(f"apply mode {mode!r}: choose physical (remove the experts) or mask (route around them)")
    if offload and plan.kind != "select":
        raise MoEError(f"offload=true streams the experts each request selects: it needs a select plan, "
                       f"not a {plan.kind} plan ({plan.method})")
    if plan.kind == "select":
        from moebench.moe.offload import ExpertOffloader

        offloader = offload if isinstance(offload, ExpertOffloader) else (ExpertOffloader(model) if offload else None)
        applied = Applied(model, plan, mode, selector_from_plan(plan), offloader)
    elif plan.kind == "prune":
        if plan.novice:  # MoNE: replaced experts answer with constants; the router is unchanged
            from moebench.moe.novice import attach_novices

            attach_novices(model, plan.keep, plan.novice, physical=mode == "physical")
        elif plan.keep:
            (prune if mode == "physical" else mask)(model, plan.keep)
        applied = Applied(model, plan, mode)
    elif plan.kind == "merge":
        if mode != "physical":
            raise MoEError(f"{plan.method} merges experts: it writes new expert weights, which routing around "
                           "experts (apply=mask) cannot express; use apply=physical")
        merge(model, plan.merge or {}, plan.expert_map)  # with an expert map: all router rows kept (router=all)
        applied = Applied(model, plan, mode)
    else:
        raise MoEError(f"plans of kind {plan.kind!r} ({plan.method}) cannot be applied; kinds applied: prune, "
                       "select, merge")
    if plan.skip:
        enable_skipping(model, plan.skip["betas"])
    return applied
