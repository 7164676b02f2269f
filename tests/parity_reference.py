"""Independent references for the parity tests: routing, experts and the authors' scores, in float64.

Nothing here calls moebench. The routing and expert functions are written from transformers 5's
modeling files (file and class named at each), the scores from the authors' released code (file
and function named at each), all in our own words. The tiny models' experts are differentiated on
purpose: expert e's down projection is scaled by 0.4 + 0.3 RANK[e] (a fixed shuffle of 0..7), so
output norms (and the scores built on them) differ clearly between experts, in no id order.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from tiny_models import sample_ids, tiny_model

PARITY_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "llama4_text")
RANK = (3, 0, 6, 1, 7, 2, 5, 4)
SEQUENCES, LENGTH, AUTHORS_BATCH = 16, 12, 8  # the authors' forward batches: 8 sequences (Expert_Sparsity main.py)


def differentiated_model(family: str):
    """A tiny model of ``family`` (Llama4 with top-2) whose experts' output scales differ by design."""
    model = tiny_model(family, **({"num_experts_per_tok": 2} if family == "llama4_text" else {}))
    with torch.no_grad():
        for layer in model.model.layers:
            block = getattr(layer, "feed_forward" if family == "llama4_text" else "mlp")
            experts = getattr(block, "experts", None)
            if experts is None or not hasattr(experts, "down_proj"):
                continue  # a dense layer
            for e in range(experts.down_proj.shape[0]):
                experts.down_proj[e] *= 0.4 + 0.3 * RANK[e]
    return model


def calibration_tokens(seed: int = 3) -> torch.Tensor:
    """The calibration set of the parity tests: 16 sequences of 12 tokens (two forward batches of 8)."""
    return sample_ids(SEQUENCES, LENGTH, seed=seed)


class Reference:
    """One MoE block's routing and experts, re-implemented in float64 from transformers' modeling code."""

    def __init__(self, family: str, block, config):
        self.family, self.config = family, config
        self.router = block.router if family == "llama4_text" else block.gate
        self.experts = block.experts
        self.k = config.num_experts_per_tok
        self.n = self.router.weight.shape[0]
        assert config.hidden_act == "silu"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw router logits ``[T, E]`` (no router has a bias on these families)."""
        return x.double() @ self.router.weight.detach().double().T

    def route(self, x: torch.Tensor, allowed=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [T, k], gates [T, k])`` as the model routes, experts outside ``allowed`` unroutable."""
        z = self.logits(x)
        if allowed is not None:
            mask = torch.zeros(self.n, dtype=torch.bool)
            mask[list(allowed)] = True
            z = z.masked_fill(~mask, float("-inf"))
        if self.family in ("mixtral", "qwen3_moe"):
            # modeling_mixtral.py MixtralTopKRouter / modeling_qwen3_moe.py Qwen3MoeTopKRouter
            w, i = torch.softmax(z, dim=-1).topk(self.k, dim=-1)
            if self.family == "mixtral" or self.config.norm_topk_prob:
                w = w / w.sum(-1, keepdim=True)
            return i, w
        if self.family == "deepseek_v3":
            return self._route_deepseek_v3(z)
        # modeling_llama4.py Llama4Router: top-k of the logits, then sigmoid of those logits
        v, i = z.topk(self.k, dim=-1)
        return i, torch.sigmoid(v)

    def _route_deepseek_v3(self, z):
        """modeling_deepseek_v3.py DeepseekV3TopkRouter: sigmoid scores, choice with the correction bias
        inside the best ``topk_group`` groups (ranked by their top-2 sum), gates renormalised and scaled."""
        s = torch.sigmoid(z)
        bias = self.router.e_score_correction_bias.detach().double()
        choice = torch.where(torch.isinf(z), torch.full_like(z, float("-inf")), s + bias)
        n_group, topk_group = self.config.n_group, self.config.topk_group
        groups = choice.view(len(z), n_group, -1).topk(2, dim=-1).values.sum(-1)
        best = groups.topk(topk_group, dim=-1).indices
        in_best = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~in_best.repeat_interleave(self.n // n_group, dim=1), float("-inf"))
        i = choice.topk(self.k, dim=-1).indices
        w = s.gather(1, i)
        if self.config.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return i, w * self.config.routed_scaling_factor

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """f_e(x): SiLU-gated MLP; Llama4 stores it transposed (modeling_llama4.py Llama4TextExperts)."""
        up_w, down_w = self.experts.gate_up_proj[e].detach().double(), self.experts.down_proj[e].detach().double()
        if self.family == "llama4_text":
            gate, up = (x.double() @ up_w).chunk(2, dim=-1)
            return (up * F.silu(gate)) @ down_w
        gate, up = (x.double() @ up_w.T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ down_w.T

    def contribution(self, e: int, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Expert e's term in the block output: g f_e(x), or f_e(g x) on Llama4 (Llama4TextMoe.forward)."""
        g = g.double().unsqueeze(-1)
        return self.expert(e, g * x.double()) if self.family == "llama4_text" else g * self.expert(e, x)

    def routed_output(self, x: torch.Tensor, allowed=None) -> torch.Tensor:
        """The block's routed output ``[T, H]`` (shared experts left out), re-running every expert."""
        idx, w = self.route(x, allowed)
        out = torch.zeros(x.shape, dtype=torch.float64)
        for e in idx.unique().tolist():
            token, slot = torch.where(idx == e)
            out.index_add_(0, token, self.contribution(e, x[token], w[token, slot]))
        return out


def block_inputs(model, view, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each MoE block's input ``[S*L, H]`` in calibration order, from plain forwards of 8 sequences."""
    seen = {layer.index: [] for layer in view.layers}
    hooks = [layer.block.register_forward_pre_hook(
        lambda _m, args, i=layer.index: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for layer in view.layers]
    with torch.no_grad():
        for start in range(0, len(tokens), AUTHORS_BATCH):
            model(input_ids=tokens[start:start + AUTHORS_BATCH])
    for hook in hooks:
        hook.remove()
    return {i: torch.cat(parts) for i, parts in seen.items()}


# ----- the authors' scores -----------------------------------------------------------------------


def raw_topk(ref: Reference, x: torch.Tensor) -> torch.Tensor:
    """The experts the REAP code counts as selected: top-k of the raw logits (observer.py, _hook_fn)."""
    return ref.logits(x).topk(ref.k, dim=-1).indices


def reap_authors(ref: Reference, x: torch.Tensor, selected: torch.Tensor) -> dict[str, torch.Tensor]:
    """CerebrasResearch/reap, src/reap/observer.py, MoETransformerObserver._hook_factory: per expert,
    over the tokens that select it, mean of p_e ||f_e(x)|| (``reap``), sum of ||f_e(x)|| (``ean_sum``)
    and the count (``expert_frequency``); p = softmax over all logits, renormalised over the selected
    experts when ``config.norm_topk_prob`` (main.py, _setup_observer); f_e on the ungated input."""
    p = torch.softmax(ref.logits(x), dim=-1)
    if getattr(ref.config, "norm_topk_prob", False):
        p = p / p.gather(1, selected).sum(-1, keepdim=True)
    out = {name: torch.zeros(ref.n, dtype=torch.float64) for name in ("reap", "ean_sum", "expert_frequency")}
    for e in range(ref.n):
        active = (selected == e).any(-1)
        if active.any():
            norm = ref.expert(e, x[active]).norm(dim=-1)
            out["reap"][e] = (p[active, e] * norm).mean()
            out["ean_sum"][e] = norm.sum()
            out["expert_frequency"][e] = active.sum()
    return out


def reap_contribution(ref: Reference, x: torch.Tensor) -> torch.Tensor:
    """moebench's default REAP, written out: mean over routed tokens of ||expert e's term in the output||."""
    idx, w = ref.route(x)
    score = torch.zeros(ref.n, dtype=torch.float64)
    for e in idx.unique().tolist():
        token, slot = torch.where(idx == e)
        score[e] = ref.contribution(e, x[token], w[token, slot]).norm(dim=-1).mean()
    return score


def keep_by_score(scores: torch.Tensor, n_keep: int, groups: tuple[int, int] | None) -> list[int]:
    """Drop the lowest scores (prune.py: torch.topk(largest=False)); with routing groups, equally per group
    (moebench's rule for group-limited routers, which the authors' code does not have)."""
    n_group = groups[0] if groups else 1
    size, per = len(scores) // n_group, n_keep // n_group
    kept = []
    for g in range(n_group):
        part = scores[g * size:(g + 1) * size]
        dropped = set(torch.topk(part, size - per, largest=False).indices.tolist())
        kept += [g * size + e for e in range(size) if e not in dropped]
    return sorted(kept)


def naee_losses(ref: Reference, x: torch.Tensor, subsets) -> torch.Tensor:
    """Lucky-Lance/Expert_Sparsity, model/wrapper.py, PrunableMixtralSparseMoeBlockWrapper.enumerate: for
    each kept set, sum over forward batches of 8 sequences of ||Z - Z(C)||_F, Z the routed output and
    Z(C) the same with the logits of the other experts at -inf, every expert re-run."""
    per_batch = AUTHORS_BATCH * LENGTH
    full = ref.routed_output(x)
    losses = []
    for subset in subsets:
        pruned = ref.routed_output(x, subset)
        losses.append(sum(torch.linalg.norm(full[b:b + per_batch] - pruned[b:b + per_batch]).item()
                          for b in range(0, len(x), per_batch)))
    return torch.tensor(losses, dtype=torch.float64)


def valid_subsets(n: int, r: int, groups: tuple[int, int] | None) -> list[tuple[int, ...]]:
    """All r-subsets of n experts; with routing groups only those keeping equal numbers per group."""
    size = n // (groups[0] if groups else 1)
    return [s for s in itertools.combinations(range(n), r)
            if not groups or len({sum(1 for e in s if e // size == g) for g in range(groups[0])}) == 1]


def naee_beta(gates: torch.Tensor) -> float:
    """Expert_Sparsity, method/dynamic_skipping.py, dynamic_skipping: numpy's median over every token of
    the second / first largest gate value (their gates: Mixtral's softmax, whose ratio equals that of the
    renormalised top-2 gates)."""
    top = gates.sort(dim=-1, descending=True).values.float()
    return float(np.median([float(t[1] / t[0]) for t in top]))


def tcess(ref: Reference, x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """JarvisPei/PreMoe, collect_utils.py, collect_moe_gate_logits_r1's hook (k = 1, r = -1) and
    build_logits_permutations: per token the top-k raw logits kept at their positions, 0 elsewhere;
    the mean over all tokens."""
    z = ref.logits(x)
    top = z.topk(k, dim=-1)
    markers = torch.zeros_like(z).scatter_(1, top.indices, top.values)
    return markers.mean(0)
