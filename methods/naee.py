"""NAEE layer-wise expert enumeration (Lu et al. 2024), by recombining cached expert outputs."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Literal

import torch

from moebench.method.registry import planner
from moebench.moe.ops import layer_mask, replayed_logits, router_linear_logits, row_mask
from moebench.moe.view import MoEError

CHUNK_ELEMENTS = 1 << 25  # repeated inputs / gathered outputs per batch of subsets (128 MiB in fp32)


AUTHORS_BATCH = 8  # calibration sequences per forward batch in the authors' code (main.py, --batch_size)


def router_input(layer, x: torch.Tensor) -> torch.Tensor:
    """Cached inputs ``x [n, H]`` (kept in CPU memory) on the router's device and in its dtype."""
    weight = layer.router.weight
    return x.to(device=weight.device, dtype=weight.dtype)


def loss_groups(stats: dict, batch_sequences: int) -> torch.Tensor:
    """The loss group of each cached token ``[n]``: its calibration sequence // ``batch_sequences``."""
    if batch_sequences < 1:
        raise ValueError(f"naee: batch_sequences={batch_sequences} must be >= 1 (sequences per Frobenius norm)")
    return torch.div(stats["outputs_sample_ids"], batch_sequences, rounding_mode="floor")


def reconstruction_loss(layer, stats: dict, kept, reference: torch.Tensor | None = None,
                        batch_sequences: int = AUTHORS_BATCH) -> float:
    """L(C) = sum over batches b of ``batch_sequences`` calibration sequences of ||F(X_b) - F(X_b; C)||_F.

    F(x) = sum over the top-k experts e of c_e(x), the routed output of the layer (shared experts
    cancel; c_e = g_e y_e, or y_e where the gate scales the input). F(x; C) re-runs the model's own
    router on x with the logits of experts outside C at -inf, then combines the cached outputs
    ``all_outputs [n, E, H]``; no expert is re-run. Only the cached tokens count.
    """
    x, outputs, group = stats["inputs"], stats["all_outputs"], loss_groups(stats, batch_sequences)
    if reference is None:
        reference = _combine(layer, x, outputs, None)
    pruned = _combine(layer, x, outputs, kept)
    diff = (reference - pruned).pow(2).sum(-1)
    per_group = torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, group, diff.double())
    return per_group.sqrt().sum().item()


GRAM_MAX_EXPERTS = 128  # per-token Gram matrices [n, E, E] in float64 up to this many experts
GRAM_MAX_BYTES = 2 << 30  # ... and up to this size (E=128, n=2048: 268 MB); beyond, outputs are gathered
GRAM_CHUNK_TOKENS = 256  # tokens per float64 einsum while the Gram matrices are built (bounds the copy)


class Recombiner:
    """Reconstruction losses of many expert subsets of one layer from its cached expert outputs.

    For a subset C the model's own router re-routes the cached inputs with the other experts
    masked; token t then gets indices i_1..i_k and gate values w_1..w_k, and its squared error is

        ||F(x_t) - sum_j w_j o_{t,i_j}||^2
            = ||F(x_t)||^2 - 2 sum_j w_j <F(x_t), o_{t,i_j}> + sum_j sum_l w_j w_l <o_{t,i_j}, o_{t,i_l}>

    With up to ``GRAM_MAX_EXPERTS`` experts (and ``GRAM_MAX_BYTES``) the per-token Gram matrices <o_{t,e}, o_{t,f}> are
    computed once in float64 and all three terms (the reference F(x_t) is itself a combination) are
    read from them, so a subset costs O(n k^2) instead of O(n k H) and a routing equal to the
    reference's scores exactly 0; beyond that the outputs are gathered and combined directly.
    Many subsets share one router call, each copy of the inputs masked to its subset (`row_mask`); routers with a
    score-correction bias (one selection per call) are routed one subset at a time. The router's
    linear is computed once on the cached inputs and replayed for every subset (`replayed_logits`),
    so a subset costs its softmax / top-k selection, not n H E multiply-adds. The loss per
    subset is the paper's sum over forward batches (``batch_sequences`` calibration sequences each)
    of the Frobenius norm of the error. Where the gate scales the expert's input, w_j = 1 (the
    cached output holds the gate).
    """

    def __init__(self, layer, stats: dict, reference: torch.Tensor | None = None,
                 batch_sequences: int = AUTHORS_BATCH):
        self.layer = layer
        self.x = router_input(layer, stats["inputs"])  # on the router's device; losses are summed on the CPU
        self.outputs, self.seq = stats["all_outputs"], loss_groups(stats, batch_sequences)
        self.n_seq = int(self.seq.max()) + 1
        n, n_experts, hidden = self.outputs.shape
        self.reference = None  # the unpruned routed output, for the gathered path only
        self.tokens = torch.arange(n)
        # the router's linear output on the cached inputs, computed once: every subset's re-routing
        # replays it under its mask (the linear would otherwise cost n H E per subset)
        self.logits = router_linear_logits(layer, self.x)
        if self.logits is not None and not self._replay_matches():
            self.logits = None
        self.gram = None
        if n_experts <= GRAM_MAX_EXPERTS and n * n_experts * n_experts * 8 <= GRAM_MAX_BYTES:
            self.gram = _gram(self.outputs)
            with torch.no_grad():
                routing = layer.route(self.x)
            weights = layer.output_weights(routing.weights)
            self.ref_routing = (routing.indices.cpu().unsqueeze(0), weights.double().cpu().unsqueeze(0))
            self.ref_sq = self._inner(self.ref_routing, self.ref_routing)  # [1, n]
        else:
            self.reference = _combine(layer, stats["inputs"], self.outputs, None) if reference is None else reference
        # subsets per router call: the repeated inputs [C n, H] (or, replayed, the logits [C n, E] and
        # Gram entries [C n, k, k]) and gathered outputs stay near the chunk size
        k = layer.top_k
        per_token = (n_experts + k * k) if self.logits is not None else hidden
        per_token = per_token if self.gram is not None else hidden * k
        self.per_call = max(1, CHUNK_ELEMENTS // (n * per_token))

    def _route(self, part: list, replay: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(indices, weights)`` ``[C, n, k]`` for the subsets in ``part``; None for correction-bias routers."""
        n = self.x.shape[0]
        allowed = torch.zeros(len(part), self.outputs.shape[1], dtype=torch.bool)
        for row, subset in enumerate(part):
            allowed[row, list(subset)] = True
        try:
            with torch.no_grad(), self._replay(len(part), replay) as inputs, row_mask(self.layer, allowed):
                routing = self.layer.route(inputs)
        except MoEError:
            return None
        return (routing.indices.reshape(len(part), n, -1).cpu(),
                self.layer.output_weights(routing.weights).reshape(len(part), n, -1).float().cpu())

    @contextmanager
    def _replay(self, copies: int, replay: bool = True):
        """The router input for ``copies`` re-routings of the cached tokens. Replayed, the router's
        linear reads the stored logits, so the input only gives the row count: one row broadcast
        (no copy of ``copies x n x H``); otherwise the inputs repeated."""
        if self.logits is None or not replay:
            yield self.x.repeat(copies, 1)
            return
        with replayed_logits(self.layer, self.logits, copies):
            yield self.x[:1].expand(copies * self.x.shape[0], -1)

    def _replay_matches(self) -> bool:
        """Whether replayed routing equals routing the real inputs, on the full set and the set without
        expert 0 (checked once per layer: a router using its input beyond the linear is not replayed)."""
        n_experts = self.outputs.shape[1]
        probe = [tuple(range(n_experts))] + ([tuple(range(1, n_experts))] if n_experts > self.layer.top_k else [])
        replayed, direct = self._route(probe), self._route(probe, replay=False)
        if replayed is None:  # correction-bias router: one subset per call
            replayed, direct = self._route_one(probe[-1]), self._route_one(probe[-1], replay=False)
        return all(torch.equal(a, b) for a, b in zip(replayed, direct, strict=True))

    def _squared_errors(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per-token squared error ``[C, n]`` (float64) of the routings ``indices`` / ``weights``."""
        if self.gram is None:
            picked = self.outputs[self.tokens[None, :, None], indices]  # [C, n, k, H]
            pruned = (picked * weights.unsqueeze(-1)).sum(2)
            return (self.reference - pruned).pow(2).sum(-1).double()
        routing = (indices, weights.double())
        ref = tuple(t.expand(len(indices), *t.shape[1:]) for t in self.ref_routing)
        # every term by the same function, so a routing equal to the reference's gives exactly 0
        return (self._inner(routing, routing) - 2 * self._inner(routing, ref) + self.ref_sq).clamp_min(0)

    def _inner(self, a: tuple, b: tuple) -> torch.Tensor:
        """<sum_j wa_j o_{ia_j}, sum_l wb_l o_{ib_l}> per token from the Gram matrices, ``[C, n]``."""
        (ia, wa), (ib, wb) = a, b
        c, n, k = ia.shape
        n_experts = self.gram.shape[-1]
        flat = (ia.unsqueeze(-1) * n_experts + ib.unsqueeze(-2)).view(c, n, k * ib.shape[-1])
        # one gather from the token's flattened [E * E] Gram row (no copy of the Gram per subset)
        pair = torch.gather(self.gram.view(n, -1).expand(c, -1, -1), 2, flat).view(c, n, k, -1)  # [C, n, k, k]
        return ((pair @ wb.unsqueeze(-1)).squeeze(-1) * wa).sum(-1)

    def losses(self, subsets: list) -> torch.Tensor:
        """The loss of every subset in ``subsets``, float64 ``[len(subsets)]``."""
        out = []
        for start in range(0, len(subsets), self.per_call):
            part = subsets[start:start + self.per_call]
            routed = self._route(part)
            if routed is None:  # score-correction bias: one router call per subset
                routed = tuple(torch.cat(parts) for parts in zip(*(self._route_one(s) for s in part), strict=True))
            sq = self._squared_errors(*routed)
            per_seq = torch.zeros(len(part), self.n_seq, dtype=torch.float64).index_add_(1, self.seq, sq)
            out.append(per_seq.sqrt().sum(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def _route_one(self, subset, replay: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self._replay(1, replay) as inputs, layer_mask(self.layer, subset):
            routing = self.layer.route(inputs)
        return routing.indices.unsqueeze(0).cpu(), self.layer.output_weights(routing.weights).float().unsqueeze(0).cpu()


def _gram(outputs: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrices ``[n, E, E]`` (float64) of ``outputs [n, E, H]``, built a chunk of tokens at a time."""
    n, n_experts, _ = outputs.shape
    gram = torch.empty(n, n_experts, n_experts, dtype=torch.float64)
    for start in range(0, n, GRAM_CHUNK_TOKENS):
        o = outputs[start:start + GRAM_CHUNK_TOKENS].double()
        torch.bmm(o, o.transpose(1, 2), out=gram[start:start + GRAM_CHUNK_TOKENS])
    return gram


def _combine(layer, x, outputs, kept):
    with torch.no_grad():
        if kept is None:
            routing = layer.route(router_input(layer, x))
        else:
            with layer_mask(layer, kept):
                routing = layer.route(router_input(layer, x))
    picked = outputs.gather(1, routing.indices.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]).cpu())
    return (picked * layer.output_weights(routing.weights).float().cpu().unsqueeze(-1)).sum(1)


def _valid(layer, subset) -> bool:
    if layer.groups is None:
        return True
    n_group = layer.groups[0]
    size = layer.num_experts // n_group
    counts = [sum(1 for e in subset if e // size == g) for g in range(n_group)]
    return len(set(counts)) == 1


def exhaustive(layer, stats, r: int, batch_sequences: int = AUTHORS_BATCH) -> list[int]:
    """The r-subset with the smallest loss over all valid subsets (ties: first in lexicographic order)."""
    subsets = [s for s in itertools.combinations(range(layer.num_experts), r) if _valid(layer, s)]
    losses = Recombiner(layer, stats, batch_sequences=batch_sequences).losses(subsets)
    return list(subsets[int(torch.argmin(losses))])  # argmin: the first of equal minima


def naive_exhaustive(layer, stats, r: int, batch_sequences: int = AUTHORS_BATCH) -> list[int]:
    """Reference enumeration without caches: re-run the real block under a routing mask per subset.

    Same loss as `reconstruction_loss`, but every expert is recomputed for every subset, as a direct
    implementation of the paper would. Used to check and to benchmark the recombination.
    """
    x, seq = router_input(layer, stats["inputs"]).unsqueeze(0), loss_groups(stats, batch_sequences)

    def run():
        out = layer.block(x)
        return (out[0] if isinstance(out, tuple) else out).squeeze(0).float()

    best, best_loss = None, float("inf")
    with torch.no_grad():
        reference = run()
        for subset in itertools.combinations(range(layer.num_experts), r):
            if not _valid(layer, subset):
                continue
            with layer_mask(layer, subset):
                diff = (reference - run()).pow(2).sum(-1).double()
            per_seq = torch.zeros(int(seq.max()) + 1, dtype=torch.float64).index_add_(0, seq, diff.cpu())
            loss = per_seq.sqrt().sum().item()
            if loss < best_loss:
                best, best_loss = list(subset), loss
    return best


def beam(layer, stats, r: int, width: int, batch_sequences: int = AUTHORS_BATCH) -> list[int]:
    """Backward elimination with a beam of ``width`` sets, then 1-for-1 swaps until none helps."""
    n = layer.num_experts
    if not layer.top_k <= r <= n:
        raise ValueError(f"naee beam: layer {layer.index} keeps {r} experts; give a number from its top-k "
                         f"{layer.top_k} to its {n} experts")
    recombiner = Recombiner(layer, stats, batch_sequences=batch_sequences)
    frontier = [tuple(range(n))]
    for size in range(n - 1, r - 1, -1):
        children = {}
        for subset in frontier:
            for drop in subset:
                child = tuple(e for e in subset if e != drop)
                if child not in children and (size > r or _valid(layer, child)) and len(child) >= layer.top_k:
                    children[child] = None
        scored = dict(zip(children, recombiner.losses(list(children)).tolist(), strict=True))
        frontier = sorted(scored, key=lambda c: (scored[c], c))[:width]
    best = list(frontier[0])
    return _swap_refine(recombiner, best)


def _swap_refine(recombiner: Recombiner, kept: list[int]) -> list[int]:
    """First-improvement 1-for-1 swaps (in (out, in) order) until none lowers the loss."""
    layer = recombiner.layer
    loss = float(recombiner.losses([kept])[0])
    while True:
        candidates = [sorted([e for e in kept if e != out_e] + [in_e]) for out_e, in_e in
                      itertools.product(list(kept), [e for e in range(layer.num_experts) if e not in kept])]
        candidates = [c for c in candidates if _valid(layer, c)]
        losses = recombiner.losses(candidates).tolist()
        better = next((i for i, value in enumerate(losses) if value < loss - 1e-12), None)
        if better is None:
            return kept
        kept, loss = candidates[better], losses[better]


@planner("naee", needs=("outputs",), bounds={"beam_width": (1, 1024), "max_exhaustive": (1, 64),
                                            "batch_sequences": (1, 1 << 20)},
         paper="Lu et al. 2024, 'Not All Experts are Equal: Efficient Expert Pruning and Skipping for "
               "Mixture-of-Experts Large Language Models', ACL (Sec. 3.2, layer-wise enumeration)",
         source="the authors' code (loss, batches of 8); token subsample default and beam search beyond E=16: ours",
         runs_routers=True)  # re-routes the cached inputs under each subset's mask
def naee(ctx, *, search: Literal["auto", "exhaustive", "beam"] = "auto", beam_width: int = 8,
         max_exhaustive: int = 16, batch_sequences: int = AUTHORS_BATCH):
    """Keep, per layer, the set C of r experts minimising sum over batches b of ||F(X_b) - F(X_b; C)||_F.

    As the authors' code (Lucky-Lance/Expert_Sparsity, model/wrapper.py,
    ``PrunableMixtralSparseMoeBlockWrapper.enumerate``): F is the layer's routed output, F(.; C)
    the same with the router's logits outside C at -inf (routing redone), and a batch b is one
    forward batch of ``batch_sequences`` consecutive calibration sequences (their default: 8;
    1 = one norm per sequence). ``search``: ``exhaustive`` (all C(E, r) sets, the paper's method),
    ``beam`` (backward elimination keeping the ``beam_width`` best sets, then 1-for-1 swaps; ours,
    for E beyond exhaustive reach), or ``auto`` (exhaustive when E <= ``max_exhaustive``, else
    beam). Losses come from cached expert outputs (recombination), so no expert is re-run per
    subset. The authors use every calibration token; the ``outputs`` statistics hold a seeded
    subsample of ``subsample_tokens`` (default 2048; 0 = every token, the authors' setting, where
    memory allows).
    """
    keep = {}
    for layer in ctx.view.layers:
        r, stats = ctx.budget[layer.index], ctx.stats[layer.index]
        if r >= layer.num_experts:
            keep[layer.index] = list(range(layer.num_experts))
        elif search == "exhaustive" or (search == "auto" and layer.num_experts <= max_exhaustive):
            keep[layer.index] = exhaustive(layer, stats, r, batch_sequences)
        else:
            keep[layer.index] = beam(layer, stats, r, beam_width, batch_sequences)
    return keep
