"""NAEE's beam search at many experts: the Gram path keeps the sets a straightforward beam search keeps."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import sample_ids, tiny_model

import moebench.methods.naee as naee
from moebench.calib.stats import CollectSettings, collect
from moebench.moe.view import MoEView


def reference_beam(layer, stats, r: int, width: int) -> list[int]:
    """The beam search written plainly: every child's loss re-routed and recombined one subset at a time
    (`reconstruction_loss`, float32 outputs), then first-improvement swaps."""
    def loss(subset):
        return naee.reconstruction_loss(layer, stats, subset)

    frontier = [tuple(range(layer.num_experts))]
    for size in range(layer.num_experts - 1, r - 1, -1):
        children = sorted({tuple(e for e in parent if e != drop) for parent in frontier for drop in parent})
        children = [c for c in children if (size > r or naee._valid(layer, c)) and len(c) >= layer.top_k]
        scored = {c: loss(c) for c in children}
        frontier = sorted(scored, key=lambda c: (scored[c], c))[:width]
    kept, best = list(frontier[0]), loss(frontier[0])
    while True:
        swaps = [sorted([e for e in kept if e != out] + [new]) for out, new in
                 itertools.product(list(kept), [e for e in range(layer.num_experts) if e not in kept])]
        better = next((c for c in swaps if naee._valid(layer, c) and loss(c) < best - 1e-12), None)
        if better is None:
            return kept
        kept, best = better, loss(better)


@pytest.mark.parametrize(("family", "experts"), [("mixtral", 16), ("qwen3_moe", 24), ("qwen2_moe", 32)])
@pytest.mark.parametrize("gram", [True, False])
def test_beam_keeps_what_a_plain_beam_search_keeps(family, experts, gram, monkeypatch):
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    model = tiny_model(family, **{key: experts})
    if not gram:
        monkeypatch.setattr(naee, "GRAM_MAX_EXPERTS", 0)
    view = MoEView(model)
    stats = collect(model, sample_ids(4, 16), ["outputs"], CollectSettings(subsample_tokens=1000), progress=False)
    layer = view.layers[-1]
    assert (naee.Recombiner(layer, stats[layer.index]).gram is not None) == gram  # E up to 128: the Gram path
    r = experts // 2
    assert naee.beam(layer, stats[layer.index], r, 4) == reference_beam(layer, stats[layer.index], r, 4)


def test_gram_is_built_in_chunks_equal_to_one_einsum(monkeypatch):
    monkeypatch.setattr(naee, "GRAM_CHUNK_TOKENS", 7)  # several chunks, uneven last one
    outputs = torch.randn(30, 5, 11)
    o = outputs.double()
    assert torch.allclose(naee._gram(outputs), torch.einsum("neh,nfh->nef", o, o), rtol=0, atol=1e-12)


def test_gram_beyond_its_byte_limit_gathers_instead(monkeypatch):
    monkeypatch.setattr(naee, "GRAM_MAX_BYTES", 8 * 8 * 8)  # less than one token's worth at n > 1
    model = tiny_model("mixtral")
    stats = collect(model, sample_ids(2, 8), ["outputs"], CollectSettings(subsample_tokens=1000), progress=False)
    layer = MoEView(model).layers[0]
    assert naee.Recombiner(layer, stats[layer.index]).gram is None


@pytest.mark.parametrize("gram", [True, False])
def test_replayed_router_logits_give_the_losses_of_real_re_routing(family, gram, monkeypatch):
    """Every family: the router's linear computed once and replayed under each subset's mask scores
    every subset exactly as routing the real inputs again does (Gram and gathered paths)."""
    if not gram:
        monkeypatch.setattr(naee, "GRAM_MAX_EXPERTS", 0)
    model = tiny_model(family)
    stats = collect(model, sample_ids(2, 8), ["outputs"], CollectSettings(subsample_tokens=1000), progress=False)
    layer = MoEView(model).layers[-1]
    replayed = naee.Recombiner(layer, stats[layer.index])
    assert replayed.logits is not None  # every family's router is a linear the replay can answer
    direct = naee.Recombiner(layer, stats[layer.index])
    direct.logits = None
    n = layer.num_experts
    subsets = [tuple(c) for c in itertools.combinations(range(n), max(layer.top_k, n - 2))
               if naee._valid(layer, c)][:12]
    assert torch.equal(replayed.losses(subsets), direct.losses(subsets))


def test_a_router_reading_its_input_beyond_the_linear_is_not_replayed():
    model = tiny_model("mixtral")
    stats = collect(model, sample_ids(2, 8), ["outputs"], CollectSettings(subsample_tokens=1000), progress=False)
    layer = MoEView(model).layers[0]
    original = layer.router.forward

    def forward(hidden):  # a router whose scores also depend on the input's norm, not only the linear
        logits, weights, indices = original(hidden)
        scale = hidden.reshape(-1, hidden.shape[-1]).norm(dim=-1, keepdim=True)
        weights = torch.softmax(logits * scale, -1).gather(-1, indices)
        return logits, weights, indices

    layer.router.forward = forward
    assert naee.Recombiner(layer, stats[layer.index]).logits is None  # falls back to re-routing the inputs
