"""Parity with the authors' released code: REAP, EAN, frequency, NAEE (loss, kept sets, beta), PreMoE
TCESS and TAER, on tiny Mixtral, Qwen3-MoE, DeepSeek-V3 and Llama4 models with differentiated experts.

The references (`tests/parity_reference.py`) are written from the authors' formulas in float64,
with routing and experts re-implemented from transformers' modeling files; moebench's numbers come
from one real statistics pass. Scores must agree within 1e-6 (relative) and kept sets exactly.
Where moebench's default deviates on purpose, the test runs the documented option that matches the
authors and asserts that the default differs, and by how much.
"""

from __future__ import annotations

import pytest
import torch
from parity_reference import (
    PARITY_FAMILIES,
    Reference,
    block_inputs,
    calibration_tokens,
    differentiated_model,
    keep_by_score,
    naee_beta,
    naee_losses,
    raw_topk,
    reap_authors,
    reap_contribution,
    tcess,
    valid_subsets,
)

from moebench.calib.stats import GROUPS, CollectSettings, collect
from moebench.method.pipeline import plan_from_stats
from moebench.method.registry import PlanContext, get_method, resolve_budget, select_top
from moebench.moe.skipping import naee_betas
from moebench.moe.view import MoEView

REL = 1e-6
_SETUP: dict[str, tuple] = {}


def setup(family: str):
    """(view, block inputs per layer, references per layer, statistics of every token), once per family."""
    if family not in _SETUP:
        model = differentiated_model(family)
        view, tokens = MoEView(model), calibration_tokens()
        inputs = block_inputs(model, view, tokens)
        refs = {layer.index: Reference(family, layer.block, view.config) for layer in view.layers}
        stats = collect(model, tokens, GROUPS, CollectSettings(batch_size=8, subsample_tokens=0), progress=False)
        _SETUP[family] = (view, inputs, refs, stats)
    return _SETUP[family]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest elementwise relative difference (two exact zeros count as equal)."""
    actual, expected = actual.detach().double().flatten(), expected.detach().double().flatten()
    return float(((actual - expected).abs() / expected.abs().clamp_min(1e-300)).nan_to_num(0.0).max())


def scores(family: str, method: str, layer, **params) -> torch.Tensor:
    view, _, _, stats = setup(family)
    ctx = PlanContext(view, stats, resolve_budget(view, ratio=0.5))
    return get_method(method).fn(ctx, layer, **params)


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_reap_ean_frequency_equal_the_reap_authors_code(family):
    """gate=reference / output=reference reproduce the REAP repository's reap, ean_sum and
    expert_frequency, kept sets included; the defaults (the gate the model applies, the output it
    computes) agree where the two readings coincide and differ measurably where they do not."""
    view, inputs, refs, _ = setup(family)
    for layer in view.layers:
        ref, x = refs[layer.index], inputs[layer.index]
        model_routing = ref.route(x)[0]
        same_tokens = torch.equal(raw_topk(ref, x).sort(-1).values, model_routing.sort(-1).values)
        # The REAP code selects by raw top-k; only a correction bias or group limit (DeepSeek-V3) changes
        # the choice. Its observer has no DeepSeek-V3 path; moebench keeps the model's routing there.
        assert same_tokens == (family != "deepseek_v3")
        authors = reap_authors(ref, x, model_routing)
        reap_ref = scores(family, "reap", layer, gate="reference")
        assert relative(reap_ref, authors["reap"]) < REL
        assert relative(scores(family, "ean", layer, output="reference"), authors["ean_sum"]) < REL
        assert torch.equal(scores(family, "frequency", layer), authors["expert_frequency"])
        for n_keep in (6, 4):
            assert select_top(reap_ref, n_keep, layer.groups) == keep_by_score(authors["reap"], n_keep, layer.groups)
        default = scores(family, "reap", layer)
        assert relative(default, reap_contribution(ref, x)) < REL  # the default is what it says it is
        gap = relative(default, authors["reap"])
        assert (gap < REL) if family == "qwen3_moe" else (gap > 1e-3), (family, gap)  # softmax + norm_topk_prob
        ean_gap = relative(scores(family, "ean", layer), authors["ean_sum"])
        assert (ean_gap > 1e-3) if family == "llama4_text" else (ean_gap < REL), (family, ean_gap)


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_naee_losses_and_kept_sets_equal_the_authors_enumeration(family):
    """Every kept set's loss (sum over forward batches of 8 sequences of the Frobenius error, all tokens)
    and the chosen set equal a re-run of every expert per subset, as the authors' enumerate does."""
    from moebench.methods.naee import Recombiner

    view, inputs, refs, stats = setup(family)
    for r in (6, 4):
        plan = plan_from_stats(view, "naee", {"search": "exhaustive"}, resolve_budget(view, keep=r), stats)
        for layer in view.layers:
            subsets = valid_subsets(layer.num_experts, r, layer.groups)
            expected = naee_losses(refs[layer.index], inputs[layer.index], subsets)
            ours = Recombiner(layer, stats[layer.index]).losses(subsets)
            assert relative(ours, expected) < REL, (family, r, relative(ours, expected))
            assert plan.keep[layer.index] == list(subsets[int(expected.argmin())])
    # One norm per sequence (an option) is a different loss: the grouping is part of the definition.
    layer = view.layers[0]
    subsets = valid_subsets(layer.num_experts, 4, layer.groups)
    per_sequence = Recombiner(layer, stats[layer.index], batch_sequences=1).losses(subsets)
    assert relative(per_sequence, naee_losses(refs[layer.index], inputs[layer.index], subsets)) > 1e-2


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_naee_beta_is_numpys_median_over_every_token(family):
    """beta_l = numpy's median of w_2 / w_1 over all 192 tokens (an even count: the mean of the two middle
    values; torch.median would take the lower). On Mixtral and Qwen3 the authors' softmax ratio is the
    gates' ratio; on DeepSeek-V3 and Llama4 moebench takes the gates the model applies (the ones the skip
    rule compares), which the authors' softmax formula does not give."""
    view, inputs, refs, stats = setup(family)
    betas = naee_betas(stats)
    for layer in view.layers:
        ref, x = refs[layer.index], inputs[layer.index]
        expected = naee_beta(ref.route(x)[1])
        assert stats[layer.index]["ratio_samples"].numel() == 192
        assert abs(betas[layer.index] - expected) <= REL * expected
        assert float(stats[layer.index]["ratio_samples"].median()) != betas[layer.index]  # lower middle value
        softmax_beta = naee_beta(torch.softmax(ref.logits(x), dim=-1))
        gap = abs(softmax_beta - expected) / expected
        assert (gap < REL) if family in ("mixtral", "qwen3_moe") else (gap > 1e-3), (family, gap)


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_premoe_tcess_equals_the_released_code(family):
    """The default premoe (v1, k=1) is the released TCESS: top-1 raw-logit markers averaged over tokens."""
    view, inputs, refs, _ = setup(family)
    for layer in view.layers:
        expected = tcess(refs[layer.index], inputs[layer.index])
        ours = scores(family, "premoe", layer)
        assert relative(ours, expected) < REL
        order = expected.sort(descending=True).values
        for n_keep in (6, 4):
            if order[n_keep - 1] > order[n_keep]:  # the released argsort breaks ties arbitrarily
                kept = sorted(torch.argsort(expected, descending=True)[:n_keep].tolist())
                assert select_top(ours, n_keep, None) == kept
        assert relative(scores(family, "premoe", layer, k=2), tcess(refs[layer.index], inputs[layer.index], 2)) < REL


def test_tcess_ranks_never_selected_experts_above_negative_ones_as_released():
    """An expert never in any top-k scores 0, so it ranks above a selected expert with negative logits:
    the released code does the same (zeros where no marker is set, mean over all tokens)."""
    from moebench.methods.premoe import tcess_scores

    logits = torch.tensor([[-1.0], [-2.0], [0.5]], dtype=torch.float64)  # top-1 logits of three tokens
    ids = torch.tensor([[0], [0], [1]])
    ours = tcess_scores(logits, ids, 3, -1.0)
    released = torch.zeros(3, 3, dtype=torch.float64).scatter_(1, ids, logits).mean(0)
    assert torch.equal(ours, released) and ours.tolist() == [-1.0, 0.5 / 3, 0.0]
    assert select_top(ours, 2) == [1, 2]


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_premoe_taer_retrieves_as_the_released_code(family):
    """TAER's key is the first MoE layer's TCESS (collect_demo.py / build_logits_permutations: the index
    holds gate_logits[0]); a query is matched by L2 on the same vector of its tokens
    (partial_process.py collect_query_logits), and every layer keeps the matched task's top experts."""
    from moebench.method.select import context_signature, selector_from_plan

    view, _, refs, _ = setup(family)
    model = view.model
    tasks = {f"t{n}": calibration_tokens(seed=10 + n) for n in range(3)}
    domain_stats = {name: collect(model, toks, ["logits"], CollectSettings(batch_size=8), progress=False)
                    for name, toks in tasks.items()}
    budget = resolve_budget(view, keep=4)
    plan = plan_from_stats(view, "premoe_taer", {}, budget, next(iter(domain_stats.values())),
                           extra={"domain_stats": domain_stats})
    selector = selector_from_plan(plan)
    first = view.layers[0].index
    task_inputs = {name: block_inputs(model, view, toks) for name, toks in tasks.items()}
    index = torch.stack([tcess(refs[first], task_inputs[name][first]) for name in tasks])
    assert relative(selector.vectors, index) < REL  # one vector of E values per task, the first layer's
    for q in range(6):
        query = calibration_tokens(seed=20 + q)[:1]
        q_inputs = block_inputs(model, view, query)
        nearest = int(torch.cdist(tcess(refs[first], q_inputs[first])[None], index)[0].argmin())
        assert selector.nearest(context_signature(model, query[0])) == nearest
        name = list(tasks)[nearest]
        for layer in view.layers:
            expected = keep_by_score(tcess(refs[layer.index], task_inputs[name][layer.index]), 4, layer.groups)
            assert selector.select(context_signature(model, query[0]))[layer.index] == expected
