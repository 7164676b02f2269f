"""Operations on the MoE view: validate a selection of kept experts, prune, mask, unmask.

A selection ``keep`` maps an MoE decoder-layer index to the expert ids it keeps; layers absent
from it keep every expert. `prune` removes the other experts physically; `mask` only stops the
router from choosing them (weights untouched, reversible) and gives the same outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moebench.moe.kernels import NOVICE_ATTR
from moebench.moe.view import MoEError, MoELayer, MoEView, _get

Keep = Mapping[int, Iterable[int]]

# Attributes that hold the routed-expert count on a block, its router or its experts.
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "out_features")


def validate_keep(view: MoEView, keep: Keep) -> dict[int, list[int]]:
    """Check a selection against the model and return it normalised (int keys, sorted ids).

    Raises `MoEError` naming every problem: unknown layers, ids out of range or repeated,
    fewer kept experts than ``top_k``, and for group-limited routers unequal drops per group or
    too few experts left per group.
    """
    problems, normal = [], {}
    by_index = {layer.index: layer for layer in view.layers}
    for key, ids in keep.items():
        index = int(key)
        layer = by_index.get(index)
        if layer is None:
            problems.append(f"layer {key}: not an MoE layer (MoE layers: {sorted(by_index)})")
            continue
        ids = [int(i) for i in ids]
        problems += _check_layer(layer, ids)
        normal[index] = sorted(set(ids))
    if problems:
        raise MoEError("invalid expert selection:\n  " + "\n  ".join(problems))
    return normal


def _check_layer(layer: MoELayer, ids: list[int]) -> list[str]:
    """Problems with keeping ``ids`` in one layer (empty when fine)."""
    n, k, where = layer.num_experts, layer.top_k, f"layer {layer.index}"
    bad = sorted({i for i in ids if not 0 <= i < n})
    if bad:
        return [f"{where}: expert ids {bad} out of range 0..{n - 1}"]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        return [f"{where}: expert ids {dup} listed more than once"]
    if len(ids) < k:
        return [f"{where}: keeps {len(ids)} experts but the router selects top_k={k}; keep at least {k}"]
    if layer.groups is None:
        return []
    n_group, topk_group = layer.groups
    size = n // n_group
    per_group = [sum(1 for i in ids if i // size == g) for g in range(n_group)]
    if len(set(per_group)) > 1:
        return [f"{where}: group-limited routing ({n_group} groups of {size}) needs equal drops per group; "
                f"kept per group {per_group}: keep {len(ids) // n_group} in each group"]
    kept = per_group[0]
    if topk_group * kept < k:
        return [f"{where}: topk_group={topk_group} x {kept} kept per group = {topk_group * kept} < top_k={k}; "
                f"keep at least {-(-k // topk_group)} experts per group"]
    if kept < layer.family.group_score_top:
        return [f"{where}: groups are ranked by their best {layer.family.group_score_top} scores; "
                f"keep at least {layer.family.group_score_top} experts per group (kept {kept})"]
    return []


def prune(model: nn.Module, keep: Keep) -> dict[int, list[int]]:
    """Remove the experts not in ``keep`` physically, in place; returns the normalised selection.

    Slices every per-expert tensor of the experts and router (weight, bias, correction bias),
    updates expert counts on the modules and on the config (the family's own key too). With
    different counts per layer the config records them in ``moebench_experts_per_layer``.
    """
    view = MoEView(model)
    if is_masked(model):
        raise MoEError("this model has a routing mask; call moebench.moe.ops.unmask(model) before prune")
    _refuse_merged(view, "pruned")
    _refuse_novices(view, "pruned")
    keep = validate_keep(view, keep)
    offloaded = _accelerate_offloaded(model, view, keep)
    if offloaded:  # their real tensors live in accelerate's hooks; slicing the meta placeholders would corrupt them
        raise MoEError(f"MoE layers {offloaded[:5]} are offloaded by accelerate (a device_map with 'cpu' or 'disk'): "
                       "moebench cannot slice them in place. Prune with --sequential (lm-eval: sequential=true), "
                       "which writes the pruned checkpoint layer by layer, or load with the experts on devices")
    for index, ids in keep.items():
        _prune_layer(view.layer(index), ids)
    counts = view.experts_per_layer
    _set_config_counts(view, counts)
    return keep


def _refuse_merged(view: MoEView, what: str) -> None:
    """Raise where a layer's experts were merged keeping every router row (`moebench.moe.expert_map`): its
    router ids are not its experts' ids, so selections by id do not apply."""
    merged = [layer.index for layer in view.layers if layer.expert_map is not None]
    if merged:
        raise MoEError(f"MoE layers {merged[:5]} hold merged experts behind all their router rows (router=all); such a "
                       f"model cannot be {what} by expert ids: apply the plan to the unmerged model")


def _refuse_novices(view: MoEView, what: str) -> None:
    """Raise where a layer has novice experts (MoNE, `moebench.moe.novice`): its router keeps every row while its
    experts module holds the real experts only, so selections by id do not apply."""
    found = [layer.index for layer in view.layers if hasattr(layer.experts, NOVICE_ATTR)]
    if found:
        raise MoEError(f"MoE layers {found[:5]} have novice experts (MoNE: constants behind router rows); such a model "
                       f"cannot be {what} by expert ids: apply the plan to the model without novices")


def _accelerate_offloaded(model: nn.Module, view: MoEView, keep: dict) -> list[int]:
    """The layers of ``keep`` whose experts or router accelerate holds offloaded (meta placeholders, the real
    tensors behind a hook). A layer-by-layer skeleton's meta tensors have no hook: those are pruned as shapes."""
    from accelerate.utils import has_offloaded_params

    if not any(has_offloaded_params(m) for m in model.modules()):
        return []
    found = []
    for index in keep:
        layer = view.layer(index)
        if any(t.is_meta for t in [*layer.expert_tensors().values(), *(t for t, _ in layer.router_tensors().values())]):
            found.append(index)
    return found


def _prune_layer(layer: MoELayer, ids: list[int]) -> None:
    """Slice one layer's experts and router to the experts ``ids``."""
    old = layer.num_experts
    if ids == list(range(old)):
        return
    for mod, tensors in ((layer.experts, {n: (t, 0) for n, t in layer.expert_tensors().items()}),
                         (layer.router, layer.router_tensors())):
        for name, (tensor, dim) in tensors.items():
            _replace_tensor(mod, name, tensor.index_select(dim, torch.tensor(ids, device=tensor.device)))
    for mod in (layer.block, layer.router, layer.experts):
        for attr in _COUNT_ATTRS:
            if getattr(mod, attr, None) == old:
                setattr(mod, attr, len(ids))


def _replace_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer at ``module.<dotted>``."""
    *path, name = dotted.split(".")
    owner = _get(module, ".".join(path)) if path else module
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        persistent = name not in owner._non_persistent_buffers_set
        owner.register_buffer(name, value.contiguous(), persistent=persistent)


def _set_config_counts(view: MoEView, counts: dict[int, int]) -> None:
    """Write the new expert counts into the config, under the family's own key as well."""
    config = view.config
    uniform = len(set(counts.values())) == 1
    value = next(iter(counts.values())) if uniform else max(counts.values())
    # setattr resolves attribute_map aliases; the raw __dict__ write keeps the family's own key
    # in config.json so readers that only know that key do not fall back to a default count.
    setattr(config, view.family.count_key, value)
    config.__dict__[view.family.count_key] = value
    if uniform:
        config.__dict__.pop("moebench_experts_per_layer", None)
    else:
        config.moebench_experts_per_layer = {str(i): n for i, n in sorted(counts.items())}


class _LogitMask(TorchFunctionMode):
    """Sets the router logits of dropped experts to -inf on the first ``[.., E]`` linear output.

    ``allowed`` is ``[E]`` (one selection for every token) or ``[B, E]`` (one per sample of a batch:
    the router sees the ``[B, L, H]`` hidden states flattened to ``[B*L, H]``, so row b's mask covers
    tokens ``b*L .. (b+1)*L - 1``; decode steps are ``L = 1``).
    """

    def __init__(self, allowed: torch.Tensor):
        super().__init__()
        self.allowed = allowed
        self.done = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and not self.done and out.shape[-1] == self.allowed.shape[-1]:
            self.done = True
            allowed = self.allowed.to(out.device)
            if allowed.dim() == 1:
                return out.masked_fill(~allowed, float("-inf"))
            rows = out.reshape(allowed.shape[0], -1, out.shape[-1])
            out = rows.masked_fill(~allowed[:, None, :], float("-inf")).reshape(out.shape)
        return out


class _ReplayLogits(TorchFunctionMode):
    """Answers the router's ``[.., E]`` linear with stored logits instead of computing it.

    ``logits [n, E]`` were computed once on inputs ``x [n, H]``; a router call on ``x`` repeated
    ``copies`` times (``[copies * n, H]``) gets them repeated, so re-routing cached inputs under many
    masks costs the selection only, not ``copies * n * H * E`` multiply-adds. A mask (`_LogitMask`)
    entered inside still applies to what is returned. Capture mode (``logits`` None) records the
    first such linear output in ``captured``.
    """

    def __init__(self, n_experts: int, logits: torch.Tensor | None = None, copies: int = 1):
        super().__init__()
        self.n_experts, self.logits, self.copies = n_experts, logits, copies
        self.captured: torch.Tensor | None = None
        self.done = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and not self.done and len(args) > 1 and args[1].shape[0] == self.n_experts:
            self.done = True
            if self.logits is None:
                self.captured = func(*args, **(kwargs or {}))
                return self.captured
            rows = args[0].shape[:-1]
            if rows.numel() != self.copies * self.logits.shape[0]:
                raise MoEError(f"router input has {rows.numel()} rows, the stored logits cover "
                               f"{self.copies} x {self.logits.shape[0]}")
            return self.logits.repeat(self.copies, 1).reshape(*rows, self.n_experts)
        return func(*args, **(kwargs or {}))


def router_linear_logits(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor | None:
    """The output ``[T, E]`` of ``layer``'s router linear on ``hidden [T, H]`` (before any softmax,
    bias or mask), for `replayed_logits`; None if the router computes no ``[.., E]`` linear."""
    capture = _ReplayLogits(layer.num_experts)
    with torch.no_grad(), capture:
        layer.route(hidden)
    return capture.captured


@contextmanager
def replayed_logits(layer: MoELayer, logits: torch.Tensor, copies: int = 1):
    """Within the block, ``layer.route`` on ``copies`` repeats of the inputs that gave ``logits``
    (`router_linear_logits`) reads them instead of running the router's linear; masks still apply."""
    with _ReplayLogits(layer.num_experts, logits, copies):
        yield layer


class _RouterMask:
    """Hooks on one router: run it with dropped experts' logits (and correction bias) at -inf."""

    def __init__(self, layer: MoELayer, ids: list[int] | None, allowed: torch.Tensor | None = None):
        self.layer = layer
        if allowed is None:
            allowed = torch.zeros(layer.num_experts, dtype=torch.bool)
            allowed[ids] = True
        self.allowed = allowed  # [E], or [B, E] per sample (see `sample_mask`)
        self.mode: _LogitMask | None = None
        self.saved_bias = None
        self.handles = [layer.router.register_forward_pre_hook(self._enter),
                        layer.router.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module, args):
        self.mode = _LogitMask(self.allowed)
        self.mode.__enter__()
        name = self.layer.family.correction_bias
        bias = _get(module, name) if name else None
        if isinstance(bias, torch.Tensor) and self.allowed.dim() == 1:
            self.saved_bias = bias.data
            dim = dict(self.layer.family.router_tensors)[name]
            shape = [1] * bias.dim()
            shape[dim] = -1
            bias.data = bias.data.masked_fill(~self.allowed.to(bias.device).view(shape), float("-inf"))

    def _exit(self, module, args, output):
        if self.saved_bias is not None:
            _get(module, self.layer.family.correction_bias).data = self.saved_bias
            self.saved_bias = None
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def mask(model: nn.Module, keep: Keep) -> dict[int, list[int]]:
    """Stop the routers from choosing experts outside ``keep``; weights stay untouched.

    Equal to `prune` with the same selection (dropped experts' logits and score-correction bias are
    -inf while the router runs, so the model's own routing code picks among the kept experts).
    Replaces any earlier mask. Undo with `unmask`. Returns the normalised selection.
    """
    view = MoEView(model)
    _refuse_merged(view, "masked")
    _refuse_novices(view, "masked")
    keep = validate_keep(view, keep)
    unmask(model)
    masks = {}
    for index, ids in keep.items():
        layer = view.layer(index)
        if len(ids) < layer.num_experts:
            masks[index] = _RouterMask(layer, ids)
    model._moebench_masks = masks
    return keep


@contextmanager
def layer_mask(layer: MoELayer, ids: Iterable[int]):
    """Within the block, ``layer``'s router chooses only among ``ids`` (for re-routing cached inputs)."""
    router_mask = _RouterMask(layer, sorted(ids))
    try:
        yield layer
    finally:
        router_mask.remove()


@contextmanager
def row_mask(layer: MoELayer, allowed: torch.Tensor):
    """Within the block, ``layer``'s router input ``[B*L, H]`` routes block b of L rows only among the
    experts ``allowed[b]`` (``[B, E]`` booleans): B selections scored in one router call.

    Routers with a score-correction bias take one selection per call (the bias is one vector):
    for them this raises `MoEError`; use `layer_mask` per selection.
    """
    if layer.family.correction_bias and _get(layer.router, layer.family.correction_bias) is not None:
        raise MoEError(f"layer {layer.index}: this router's score-correction bias is one vector, so row-wise "
                       "selections cannot share a call; mask one selection at a time (layer_mask)")
    router_mask = _RouterMask(layer, None, allowed)
    try:
        yield layer
    finally:
        router_mask.remove()


@contextmanager
def sample_mask(model: nn.Module, keeps: list[Keep]):
    """Within the block, sample b of the batch routes only among ``keeps[b]`` (per-sample masks).

    ``keeps``: one selection per batch row (validated like `mask`); inputs must be ``[len(keeps), L]``.
    Layers where every row keeps every expert get no hook, so full selections are the unpruned model.
    Routers with a score-correction bias need one selection for the whole batch (the bias is one vector).
    """
    view = MoEView(model)
    keeps = [validate_keep(view, keep) for keep in keeps]
    masks = []
    try:
        for layer in view.layers:
            allowed = torch.ones(len(keeps), layer.num_experts, dtype=torch.bool)
            for row, keep in enumerate(keeps):
                if layer.index in keep:
                    allowed[row] = False
                    allowed[row, keep[layer.index]] = True
            if allowed.all():
                continue
            if (allowed == allowed[0]).all():
                masks.append(_RouterMask(layer, None, allowed[0]))
                continue
            if layer.family.correction_bias and _get(layer.router, layer.family.correction_bias) is not None:
                raise MoEError(f"layer {layer.index}: per-sample selections differ within the batch, but this "
                               "router's score-correction bias is one vector; use batch_size=1")
            masks.append(_RouterMask(layer, None, allowed))
        yield keeps
    finally:
        for router_mask in masks:
            router_mask.remove()


def unmask(model: nn.Module) -> None:
    """Remove a routing mask set by `mask` (no-op if there is none)."""
    for router_mask in getattr(model, "_moebench_masks", {}).values():
        router_mask.remove()
    model._moebench_masks = {}


def mask_signature(model: nn.Module) -> str | None:
    """A short hash of the active routing mask (None without one): masked and unmasked weights are
    the same tensors, so anything keyed by the weights (the statistics cache) must add this."""
    masks = getattr(model, "_moebench_masks", None)
    if not masks:
        return None
    import hashlib

    text = ";".join(f"{i}:{m.allowed.nonzero().flatten().tolist()}" for i, m in sorted(masks.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def is_masked(model: nn.Module) -> bool:
    """Whether a routing mask is active on ``model``."""
    return bool(getattr(model, "_moebench_masks", None))


def slot_experts(layer: MoELayer, ids: list[int]) -> None:
    """Make ``layer``'s experts module hold the experts ``ids`` (in that order, repeats allowed), router unchanged."""
    old = int(next(iter(layer.expert_tensors().values())).shape[0])
    index = torch.tensor(ids, dtype=torch.long)
    for name, t in layer.expert_tensors().items():
        _replace_tensor(layer.experts, name, t.index_select(0, index.to(t.device)))
    for attr in _COUNT_ATTRS:
        if getattr(layer.experts, attr, None) == old:
            setattr(layer.experts, attr, len(ids))
