"""Dynamic skipping: beta = 0 is exact, the median beta skips about half the second slots,
and skipped (token, expert) pairs are never computed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moebench.calib.stats import collect
from moebench.moe.kernels import observing
from moebench.moe.skipping import SkipRule, disable_skipping, enable_skipping, naee_betas, skip_report
from moebench.moe.view import MoEError, MoEView

IDS = sample_ids(4, 32)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_beta_zero_equals_no_skipping_and_median_skips_half(family):
    model = tiny_model(family)
    reference = logits(model)
    stats = collect(model, IDS, ["routing"], progress=False)
    enable_skipping(model, dict.fromkeys(stats, 0.0))
    assert torch.allclose(logits(model), reference, atol=1e-5)
    assert skip_report(model)["skipped"] == 0
    enable_skipping(model, naee_betas(stats))
    skipped = logits(model)
    report = skip_report(model)
    # On the calibration tokens the median skips half of the second slots in the first layer, whose
    # inputs skipping cannot change (k = 2: half the second slots = a quarter of the pairs).
    first = report["layers"][str(min(stats))]
    assert 0.23 <= first["skip_rate"] <= 0.25
    assert 0.3 <= report["slot_skip_rate"] <= 0.6
    assert not torch.allclose(skipped, reference)
    disable_skipping(model)
    assert torch.allclose(logits(model), reference, atol=1e-5)


def test_skipped_pairs_are_not_computed():
    model = tiny_model("mixtral")
    stats = collect(model, IDS, ["routing"], progress=False)
    enable_skipping(model, naee_betas(stats))

    class Count:
        rows = 0

        def routed(self, experts, hidden, index, weights, outputs):
            Count.rows += sum(len(token) for token, _, _ in outputs.values())

    experts = [layer.experts for layer in MoEView(model).layers]
    with observing(experts, [Count()] * len(experts)):
        logits(model)
    report = skip_report(model)
    assert Count.rows == report["pairs"] - report["skipped"] > 0


def test_rule_keeps_the_top_slot_and_the_total_gate_mass():
    rule = SkipRule(0.5)
    weights = torch.tensor([[0.7, 0.3], [0.55, 0.45], [0.2, 0.8]])
    new, active = rule(weights)
    assert active.tolist() == [[True, False], [True, True], [False, True]]
    assert torch.allclose(new, torch.tensor([[1.0, 0.0], [0.55, 0.45], [0.0, 1.0]]))
    scaled = torch.tensor([[1.5, 0.5, 0.1]])  # DeepSeek-style scaled gates: mass 2.1 is kept
    new, active = SkipRule(0.2)(scaled)
    assert active.tolist() == [[True, True, False]] and torch.allclose(new.sum(), torch.tensor(2.1))


def test_skipping_outside_the_experts_slot_is_an_error():
    with pytest.raises(MoEError, match="not available for this family"):
        enable_skipping(tiny_model("llama4_text"), {})
