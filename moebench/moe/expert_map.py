"""Merged layers that keep every router row: the member -> merged-expert map (the merging authors' form).

HC-SMoE's and MC-SMoE's code write each group's merged weights into one expert module and point every
member's slot at it, keeping all E router rows: the router scores, selects and weighs the E original
experts as before, and a token routed to any member reaches the merged expert with that member's gate
(two chosen members of one group: the merged expert's output weighted by the sum of their gates).

moebench holds that structure without duplicated weights. A merged layer's experts module keeps its G
merged experts only; its router is unchanged (E rows, the family's own scoring, top-k, renormalisation,
group-limited routing and score-correction bias); ``map [E]`` gives, for each original expert slot, the
position of its group's merged expert among the G. Where the block routes through transformers' experts
slot (every family but Llama4), a forward hook on the router rewrites the chosen indices through the map
before the block dispatches them; every experts kernel (transformers' eager, grouped_mm, batched_mm and
deepgemm, and moebench's) adds up a token's k (expert, gate) pairs, so repeated merged indices add up as in
the authors' model. Llama4 runs every expert on its gated input, y = sum_e f_e(g_e x): hooks on its experts
module regroup the E gated copies of the input by merged expert (smaller groups padded with rows whose
outputs are dropped) and return the outputs in slot order. `moebench.moe.view.MoELayer.num_experts` is G
and `MoELayer.route` returns merged-expert indices on such a layer.

Checkpoints (`moebench.moe.checkpoint.save_pruned`): the *compact* form keeps the config's expert count E
(the router's rows), records the maps in config.json under `MAP_KEY` (``{"<layer>": [E ints]}``) and writes
the ``[G, ...]`` expert tensors under transformers' fused names; `moebench.moe.checkpoint.load_model` builds
the model, cuts each such layer's experts to G and attaches the map. Plain transformers cannot route it
without the map and refuses to load it (the experts' shapes do not match the config). The *duplicated* form
(`duplicated`) is the authors' structure written out: E experts, slot e holding a copy of merged expert
map[e], no map; plain transformers and vLLM load it, and it saves no memory.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from moebench.moe.ops import slot_experts
from moebench.moe.view import MAP_ATTR, MERGED_ATTR, MoEError, MoELayer, MoEView

MAP_KEY = "moebench_expert_map"
LAYOUTS = ("compact", "duplicated")
_SLOTS_ATTR = "_moebench_expert_slots"  # Llama4: [G, M] slots of each merged expert, padded with E


def map_from_groups(groups: list[dict], n_experts: int) -> list[int]:
    """``[E]``: for each expert, the position of its group's ``into`` among the sorted ``into`` ids (-1: in no
    group)."""
    position = {e: i for i, e in enumerate(sorted(g["into"] for g in groups))}
    out = [-1] * n_experts
    for g in groups:
        for e in g["experts"]:
            if 0 <= e < n_experts:
                out[e] = position[g["into"]]
    return out


def _holder(layer: MoELayer) -> nn.Module:
    """The module that carries the map and its hooks: the router, or the experts where the block runs them
    on dense gated inputs (Llama4)."""
    return layer.experts if layer.family.router_output == "dense_scores" else layer.router


def _mapped_indices(module, args, output):
    """Router forward hook: ``(logits, weights, indices)`` with the indices rewritten through the map."""
    mapping = getattr(module, MAP_ATTR)
    logits, weights, indices, *rest = output
    return (logits, weights, mapping.to(indices.device)[indices], *rest)


def _slots(mapping: torch.Tensor) -> torch.Tensor:
    """``[G, M]``: the slots of each merged expert, padded with E (M the largest group)."""
    n, merged = mapping.numel(), int(mapping.max()) + 1
    members = [torch.nonzero(mapping == g).flatten().cpu() for g in range(merged)]
    slots = torch.full((merged, max(len(m) for m in members)), n, dtype=torch.long)
    for g, m in enumerate(members):
        slots[g, :len(m)] = m
    return slots


def _dense_inputs(module, args):
    """Experts pre-hook (Llama4): the ``[E*T, H]`` gated inputs regrouped as ``[G*M*T, H]`` by merged expert."""
    x, n = args[0], getattr(module, MAP_ATTR).numel()
    slots = getattr(module, _SLOTS_ATTR).to(x.device)
    rows = x.view(n, -1, x.shape[-1])
    padded = torch.cat((rows, rows.new_zeros(1, *rows.shape[1:])))
    return (padded[slots].reshape(-1, x.shape[-1]), *args[1:])


def _dense_outputs(module, args, output):
    """Experts forward hook (Llama4): the ``[G*M*T, H]`` outputs put back in slot order ``[E*T, H]``."""
    n = getattr(module, MAP_ATTR).numel()
    slots = getattr(module, _SLOTS_ATTR).to(output.device)
    y = output.view(*slots.shape, -1, output.shape[-1])
    out = y.new_zeros(n + 1, *y.shape[2:])
    out[slots] = y  # padding slots all land in row n, which is dropped
    return out[:n].reshape(-1, output.shape[-1])


_HOOKS = (_mapped_indices, _dense_inputs, _dense_outputs)


def attach(layer: MoELayer, mapping) -> None:
    """Route ``layer`` through ``mapping`` (``[E]`` slot -> merged-expert position; its experts already hold the
    G merged experts): a non-persistent buffer and hooks on the router (experts for Llama4). Replaces any map."""
    detach(layer)
    target = _holder(layer)
    weight = layer.router.weight
    device = "cpu" if weight.is_meta else weight.device  # a layer-by-layer skeleton: the values must stay readable
    mapping = torch.as_tensor(mapping, dtype=torch.long, device=device)
    target.register_buffer(MAP_ATTR, mapping, persistent=False)
    setattr(target, MERGED_ATTR, int(mapping.max()) + 1)
    if target is layer.router:
        target.register_forward_hook(_mapped_indices)
    else:
        target.register_buffer(_SLOTS_ATTR, _slots(mapping).to(device), persistent=False)
        target.register_forward_pre_hook(_dense_inputs)
        target.register_forward_hook(_dense_outputs)


def detach(layer: MoELayer) -> None:
    """Remove ``layer``'s map and hooks (no-op without one); its experts are left as they are."""
    for module in (layer.router, layer.experts):
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if fn in _HOOKS]:
                del hooks[key]
        module._buffers.pop(MAP_ATTR, None)
        module._buffers.pop(_SLOTS_ATTR, None)
        module.__dict__.pop(MERGED_ATTR, None)


def share(model: nn.Module, keep: dict[int, list[int]], maps: dict[int, list[int]]) -> None:
    """Merged layers that keep every router row, in place: each layer's experts cut to its ``keep`` (the groups'
    merged experts, sorted) and routed through ``maps[layer]``; the config records the maps (`MAP_KEY`)."""
    view = MoEView(model)
    for index, ids in keep.items():
        layer = view.layer(index)
        slot_experts(layer, sorted(ids))
        attach(layer, maps[index])
    _write_config(view)


def _write_config(view: MoEView) -> None:
    """Record the maps of ``view``'s merged layers in its config (removed where none is left)."""
    maps = {str(layer.index): layer.expert_map.tolist() for layer in view.layers if layer.expert_map is not None}
    if maps:
        setattr(view.config, MAP_KEY, maps)
    else:
        view.config.__dict__.pop(MAP_KEY, None)


def expert_maps(config) -> dict[int, list[int]] | None:
    """The maps a config records (`MAP_KEY`), or None."""
    text = getattr(config, "text_config", None) or config
    maps = getattr(text, MAP_KEY, None)
    return {int(k): [int(e) for e in v] for k, v in maps.items()} if maps else None


def model_maps(model: nn.Module) -> dict[int, list[int]]:
    """The maps of ``model``'s merged layers that keep every router row (empty without any, or for a model that
    is no MoE model moebench knows)."""
    try:
        layers = MoEView(model).layers
    except MoEError:
        return {}
    return {layer.index: layer.expert_map.tolist() for layer in layers if layer.expert_map is not None}


def build(model: nn.Module, maps: dict[int, list[int]]) -> None:
    """Shape a model freshly built from a compact checkpoint's config: each mapped layer's experts cut to its G
    and the map attached (the weights are loaded afterwards)."""
    view = MoEView(model)
    for index, mapping in maps.items():
        layer = view.layer(index)
        if len(mapping) != layer.num_experts:
            raise MoEError(f"layer {index}: the config's {MAP_KEY} has {len(mapping)} entries for {layer.num_experts} "
                           "router rows")
        slot_experts(layer, list(range(max(mapping) + 1)))
        attach(layer, mapping)


def expand(model: nn.Module) -> dict[int, list[int]]:
    """The duplicated form, in place: every merged layer holds E experts again, slot e a copy of merged expert
    map[e]; maps, hooks and the config key removed (a plain model). Returns the maps removed."""
    view = MoEView(model)
    maps = model_maps(model)
    for index, mapping in maps.items():
        layer = view.layer(index)
        slot_experts(layer, mapping)
        detach(layer)
    _write_config(view)
    return maps


def compact(model: nn.Module, maps: dict[int, list[int]]) -> None:
    """The inverse of `expand`: each layer of ``maps`` keeps one copy of each merged expert and routes through
    its map again."""
    view = MoEView(model)
    for index, mapping in maps.items():
        layer = view.layer(index)
        slot_experts(layer, [mapping.index(g) for g in range(max(mapping) + 1)])
        attach(layer, mapping)
    _write_config(view)


@contextmanager
def duplicated(model: nn.Module):
    """Within the block ``model`` is in the duplicated form (`expand`), afterwards compact again; memory grows
    to E experts per merged layer meanwhile."""
    maps = expand(model)
    try:
        yield model
    finally:
        if maps:
            compact(model, maps)


def plain_config(config):
    """A copy of ``config`` without `MAP_KEY` (the duplicated form's config)."""
    out = copy.deepcopy(config)
    text = getattr(out, "text_config", None) or out
    text.__dict__.pop(MAP_KEY, None)
    return out
