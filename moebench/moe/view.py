"""The MoE view: an architecture-neutral view over a transformers >= 5 MoE model.

`MoEView(model)` finds the MoE layers (dense layers are skipped), and for each one exposes the
router, the fused per-expert tensors, shared experts, ``top_k`` and the expert count, plus
`MoELayer.route`, which runs the model's own router and returns the gate values it really
computes. Architecture facts come from the table in `moebench.moe.families`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from moebench.moe.families import Family, dense_score_function, family_for, supported_model_types
from moebench.moe.kernels import NOVICE_ATTR

MAP_ATTR = "_moebench_expert_map"  # [E] slot -> merged expert, on a merged layer that keeps every router row
MERGED_ATTR = "_moebench_merged_experts"  # G, beside it (read without a device synchronisation)


class MoEError(ValueError):
    """A model or an expert selection that moebench cannot work with; the message says why and the fix."""


def _get(module: nn.Module, dotted: str):
    """``module.a.b`` for ``dotted="a.b"``, or None where any part is missing."""
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class Routing:
    """What a router decided for T tokens.

    Attributes:
        logits: router logits ``[T, E]`` (before any score function).
        weights: gate values the block multiplies expert outputs with ``[T, k]``.
        indices: selected expert ids ``[T, k]``.
    """

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


class MoELayer:
    """One MoE block of a model: its router, fused experts and shared experts.

    Attributes:
        index: decoder-layer index of this block (the key used in plans).
        block: the MoE block module; ``router``, ``experts``: its router and fused experts.
        family: the architecture row describing it.
    """

    def __init__(self, index: int, block: nn.Module, family: Family, config):
        self.index = index
        self.block = block
        self.family = family
        self.config = config
        self.router: nn.Module = getattr(block, family.router)
        self.experts: nn.Module = getattr(block, family.experts)

    @property
    def num_experts(self) -> int:
        """Routed experts in this layer now (after any physical pruning).

        With novice experts (MoNE, `moebench.moe.novice`) the router keeps every row while the experts
        module holds only the real experts: this is the count the experts module holds.
        """
        novices = getattr(self.experts, NOVICE_ATTR, None)
        if novices is not None:
            return int(novices.physical)
        for module in (self.router, self.experts):  # a merged layer that keeps every router row: its G experts
            merged = getattr(module, MERGED_ATTR, None)
            if merged is not None:
                return int(merged)
        return int(self.router.weight.shape[0])

    @property
    def expert_map(self) -> torch.Tensor | None:
        """``[E]`` (long): on a merged layer that keeps all E router rows (`moebench.moe.expert_map`), the merged
        expert each router slot dispatches to; None on any other layer."""
        for module in (self.router, self.experts):
            mapping = module._buffers.get(MAP_ATTR)
            if mapping is not None:
                return mapping
        return None

    @property
    def top_k(self) -> int:
        """Experts each token is routed to."""
        return int(self.router.top_k if hasattr(self.router, "top_k") else self.config.num_experts_per_tok)

    @property
    def shared_experts(self) -> dict[str, nn.Module]:
        """Shared experts (and their gates) by attribute name; never pruned."""
        mods = {name: getattr(self.block, name, None) for name in self.family.shared}
        return {name: mod for name, mod in mods.items() if mod is not None}

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-expert tensor of the fused experts, by name; dim 0 is the expert ``[E, ...]``."""
        named = list(self.experts.named_parameters(recurse=False)) + list(self.experts.named_buffers(recurse=False))
        return {name: t for name, t in named
                if t.dim() >= 1 and t.shape[0] == self.num_experts and not name.startswith("_moebench")}

    def router_tensors(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Per-expert router tensors present on this router: name -> (tensor, expert dim)."""
        found = {}
        for name, dim in self.family.router_tensors:
            t = _get(self.router, name)
            if isinstance(t, torch.Tensor):
                found[name] = (t, dim)
        return found

    @property
    def groups(self) -> tuple[int, int] | None:
        """``(n_group, topk_group)`` if this layer's router limits routing to groups, else None."""
        if self.family.group_keys is None:
            return None
        if getattr(self.config, "topk_method", "group_limited_greedy") == "greedy":
            return None
        n_group, topk_group = (getattr(self.config, key, None) for key in self.family.group_keys)
        if not n_group or n_group <= 1:
            return None
        return int(n_group), int(topk_group)

    @property
    def renormalises(self) -> bool:
        """Whether the top-k gate values are renormalised to sum to one."""
        rule = self.family.renormalise
        return bool(getattr(self.config, rule, False)) if isinstance(rule, str) else rule

    @property
    def scaling(self) -> float:
        """Factor applied to the gate values (``routed_scaling_factor``), 1.0 when absent."""
        key = self.family.scaling_key
        return float(getattr(self.config, key, 1.0) or 1.0) if key else 1.0

    def dense_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's score function on every logit ``[T, E]`` (softmax, or sigmoid for sigmoid routers)."""
        logits = logits.float()
        if dense_score_function(self.family) == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def expert_gates(self, logits: torch.Tensor) -> torch.Tensor:
        """The gate each expert gets when chosen, ``[T, E]``, for gates that depend on its own logit only.

        Used where the gate scales the expert's input (``gate_scales_input``): the gated output of
        an expert is then the same whichever others are routable, so it can be cached once.
        """
        if self.renormalises or dense_score_function(self.family) != "sigmoid":
            raise MoEError(f"{self.family.name}: its gate depends on the other chosen experts "
                           f"({self.describe()}); per-expert gates exist only for unnormalised sigmoid routers")
        return self.dense_scores(logits) * self.scaling

    def output_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """The factors ``[T, k]`` the block multiplies the chosen experts' observed outputs with.

        The gate values where the gate scales the output; ones where it scales the input (the
        observed output f_e(g_e x) already holds the gate).
        """
        return torch.ones_like(weights) if self.family.gate_scales_input else weights

    def expert_bytes(self) -> int:
        """Bytes held by the routed experts' tensors of this layer."""
        return sum(t.numel() * t.element_size() for t in self.expert_tensors().values())

    def route(self, hidden: torch.Tensor) -> Routing:
        """Run the model's own router on ``hidden [T, H]`` and return its decisions.

        Any active routing mask (`moebench.moe.ops.mask`) applies, since the real router runs. On a merged layer
        that keeps every router row the indices are the merged experts dispatched to (`expert_map`). Raises
        `MoEError` when the router's weights are on the meta device (a layer-by-layer skeleton): torch
        would answer with uninitialised memory instead of failing.
        """
        if any(t.is_meta for t in self.router.parameters()):
            raise MoEError(f"MoE layer {self.index}: its router's weights are not loaded (meta device: a model "
                           "opened layer by layer, --sequential); read them first (LayeredCheckpoint.routers()) or "
                           "plan with --no-sequential")
        out = self.router(hidden.reshape(-1, hidden.shape[-1]))
        if self.family.router_output == "dense_scores":
            scores, logits = out
            weights, indices = torch.topk(scores, self.top_k, dim=-1)
            mapping = self.expert_map
            if mapping is not None:  # the triple routers' hook maps them (moebench.moe.expert_map)
                indices = mapping.to(indices.device)[indices]
            return Routing(logits, weights, indices)
        logits, weights, indices = out[:3]
        return Routing(logits, weights, indices)

    def describe(self) -> str:
        """A one-line description of the routing rule, e.g. ``softmax top-2, renormalised``."""
        parts = [f"{self.family.scoring} top-{self.top_k}"]
        if self.renormalises:
            parts.append("renormalised")
        if self.family.correction_bias and _get(self.router, self.family.correction_bias) is not None:
            parts.append("score-correction bias")
        if self.groups:
            parts.append(f"{self.groups[0]} groups, best {self.groups[1]} used")
        if self.scaling != 1.0:
            parts.append(f"scaled x{self.scaling:g}")
        if "bias" in self.router_tensors():
            parts.append("router bias")
        if self.expert_map is not None:
            parts.append(f"{self.expert_map.numel()} router rows onto {self.num_experts} merged experts")
        return ", ".join(parts)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` on every supported family)."""
    for base in (getattr(model, "model", None), getattr(model, "base_model", None), model):
        layers = getattr(base, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise MoEError(f"{type(model).__name__} has no decoder layer list at `model.model.layers`; "
                   "moebench needs a transformers causal-LM model")


class MoEView:
    """An architecture-neutral view over the MoE layers of a transformers >= 5 model.

    Raises `MoEError` for an unknown family, a model without MoE layers, or a transformers
    4.x-style model whose experts are separate modules instead of fused ``[E, ...]`` tensors.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = getattr(model.config, "text_config", None) or model.config
        self.model_type = self.config.model_type
        family = family_for(self.model_type)
        if family is None:
            raise MoEError(f"model_type '{self.model_type}' is not a supported MoE family; supported: "
                           f"{', '.join(supported_model_types())}")
        self.family = family

    @cached_property
    def layers(self) -> list[MoELayer]:
        """The MoE layers in decoder order; dense decoder layers are skipped."""
        found = []
        for i, layer in enumerate(_decoder_layers(self.model)):
            block = getattr(layer, self.family.block, None)
            if block is None or not hasattr(block, self.family.router):
                continue
            experts = getattr(block, self.family.experts, None)
            if isinstance(experts, nn.ModuleList):
                raise MoEError(
                    f"layer {i} of this {self.family.name} model holds its experts as a list of modules "
                    "(transformers 4.x style or remote code); moebench needs transformers >= 5 fused "
                    "experts: load it with transformers >= 5 and without trust_remote_code")
            found.append(MoELayer(i, block, self.family, self.config))
        if not found:
            raise MoEError(f"this {self.family.name} model has no MoE layers (all {len(_decoder_layers(self.model))} "
                           "decoder layers are dense); there are no experts to prune")
        return found

    def layer(self, index: int) -> MoELayer:
        """The MoE layer at decoder-layer ``index``."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise MoEError(f"decoder layer {index} is not an MoE layer; MoE layers: {self.indices}")

    @property
    def indices(self) -> list[int]:
        """Decoder-layer indices of the MoE layers."""
        return [layer.index for layer in self.layers]

    @property
    def experts_per_layer(self) -> dict[int, int]:
        """Routed experts per MoE layer now."""
        return {layer.index: layer.num_experts for layer in self.layers}

    @property
    def top_k(self) -> int:
        """Experts per token (the same in every MoE layer on all supported families)."""
        return self.layers[0].top_k

    def expert_bytes(self) -> int:
        """Bytes held by routed experts over all MoE layers."""
        return sum(layer.expert_bytes() for layer in self.layers)

    def total_bytes(self) -> int:
        """Bytes held by all parameters and persistent buffers of the model."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
