"""The merge operation on every family: unit permutations, merging identical experts, groups of one,
weight matching, validation, and merged checkpoints that plain transformers loads with identical logits."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, sample_ids, tiny_model

from moebench.method.apply import apply
from moebench.method.plan import Plan
from moebench.moe.kernels import expert_forward
from moebench.moe.merge import intermediate_size, match_units, merge, permuted, validate_merge
from moebench.moe.ops import prune
from moebench.moe.view import MoEError, MoEView

X = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_ids()).logits


def output(layer, e=None, weights=None) -> torch.Tensor:
    with torch.no_grad():
        return expert_forward(layer.experts, 0 if e is None else e, X, weights=weights)


def copy_expert(layer, source: int, target: int, perm=None) -> None:
    """Overwrite expert ``target``'s tensors with ``source``'s (its units reordered by ``perm``)."""
    with torch.no_grad():
        for name, t in permuted(layer, source, perm).items():
            layer.expert_tensors()[name].data[target] = t


def shuffled(layer, seed: int = 0) -> list[int]:
    return torch.randperm(intermediate_size(layer), generator=torch.Generator().manual_seed(seed)).tolist()


def test_unit_permutation_keeps_the_expert_function(family):
    layer = MoEView(tiny_model(family)).layers[0]
    perm = shuffled(layer)
    torch.testing.assert_close(output(layer, weights=permuted(layer, 2, perm)), output(layer, 2),
                               rtol=1e-5, atol=1e-4)
    # the gate/up layout matters: the other arrangement of the same permutation changes the expert
    layer.family = replace(layer.family, gate_up_interleaved=not layer.family.gate_up_interleaved)
    assert not torch.allclose(output(layer, weights=permuted(layer, 2, perm)), output(layer, 2), atol=1e-3)


def test_weight_matching_recovers_a_permuted_copy(family):
    layer = MoEView(tiny_model(family)).layers[0]
    perm = shuffled(layer, seed=1)
    copy_expert(layer, 1, 4, perm)
    found = match_units(layer, 1, 4)
    assert [perm[j] for j in found] == list(range(intermediate_size(layer)))
    for name, t in permuted(layer, 4, found).items():
        assert torch.equal(t, layer.expert_tensors()[name][1])


def _pair_in_one_routing_group(view):
    layer = view.layers[0]
    size = layer.num_experts // (layer.groups[0] if layer.groups else 1)
    return 0, size - 1  # the first and last expert of the first routing group


def test_merging_identical_experts_equals_pruning_one(family):
    model, reference = tiny_model(family), tiny_model(family)
    a, b = _pair_in_one_routing_group(MoEView(model))
    for m in (model, reference):
        for layer in MoEView(m).layers:
            copy_expert(layer, a, b)
    # with group-limited routing (groups of b + 1) the second routing group drops its last expert too
    # (equal drops per group); without groups b + 1 = 8 and nothing else is dropped
    rest = [i for i in range(8) if i not in (a, b, 2 * b + 1)]
    layers = MoEView(model).indices
    before = {i: output(MoEView(model).layer(i), a) for i in layers}
    groups = {i: [{"into": a, "experts": [a, b], "weights": [0.3, 0.7]}] + [
        {"into": e, "experts": [e], "weights": [1.0]} for e in rest] for i in layers}
    merge(model, groups)
    prune(reference, {i: [a, *rest] for i in layers})
    for i in layers:  # the merged expert computes what either identical expert computed
        torch.testing.assert_close(output(MoEView(model).layer(i), 0), before[i], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-6, atol=1e-6)


def test_a_group_of_one_is_pruning_the_others(family):
    model, reference = tiny_model(family), tiny_model(family)
    view = MoEView(model)
    keep = {i: [0, 1, 2, 3, 4, 5] if not view.layer(i).groups else [0, 1, 2, 4, 5, 6] for i in view.indices}
    merge(model, {i: [{"into": e, "experts": [e], "weights": [1.0]} for e in ids] for i, ids in keep.items()})
    prune(reference, keep)
    assert MoEView(model).experts_per_layer == MoEView(reference).experts_per_layer
    assert torch.equal(logits(model), logits(reference))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text"])
def test_alignment_makes_a_permuted_copy_merge_exactly(family):
    aligned, plain, reference = tiny_model(family), tiny_model(family), tiny_model(family)
    for m in (aligned, plain, reference):
        for layer in MoEView(m).layers:
            copy_expert(layer, 0, 7, shuffled(layer, seed=layer.index))
    layers = MoEView(aligned).indices
    rest = [{"into": e, "experts": [e], "weights": [1.0]} for e in range(1, 7)]
    pair = {"into": 0, "experts": [0, 7], "weights": [0.5, 0.5]}
    perms = {i: [None, match_units(MoEView(aligned).layer(i), 0, 7)] for i in layers}
    merge(aligned, {i: [{**pair, "perms": perms[i]}, *rest] for i in layers})
    merge(plain, {i: [pair, *rest] for i in layers})
    prune(reference, {i: list(range(7)) for i in layers})
    torch.testing.assert_close(logits(aligned), logits(reference), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(plain), logits(reference), atol=1e-3)  # unaligned averaging differs


def test_router_average_mixes_the_rows():
    model = tiny_model("deepseek_v3")
    layer = MoEView(model).layers[0]
    rows = layer.router.weight.detach().clone()
    bias = layer.router.e_score_correction_bias.detach().clone()
    groups = [{"into": 1, "experts": [0, 1], "weights": [0.25, 0.75], "router": [0.25, 0.75]},
              *({"into": e, "experts": [e], "weights": [1.0]} for e in (2, 4, 5))]
    merge(model, {layer.index: groups})
    layer = MoEView(model).layer(layer.index)
    torch.testing.assert_close(layer.router.weight[0], 0.25 * rows[0] + 0.75 * rows[1])
    torch.testing.assert_close(layer.router.e_score_correction_bias[0], 0.25 * bias[0] + 0.75 * bias[1])
    assert torch.equal(layer.router.weight[1:], rows[[2, 4, 5]])


@pytest.mark.parametrize("groups, message", [
    ([{"into": 0, "experts": [0, 1], "weights": [0.5, 0.5]}, {"into": 1, "experts": [1, 2], "weights": [0.5, 0.5]}],
     "experts [1] are in more than one group"),
    ([{"into": 3, "experts": [0, 1], "weights": [0.5, 0.5]}, {"into": 2, "experts": [2], "weights": [1.0]}],
     "`into` must be one of its experts [0, 1]"),
    ([{"into": 0, "experts": [0, 1], "weights": [0.5, 0.6]}, {"into": 2, "experts": [2], "weights": [1.0]}],
     "weights [0.5, 0.6] must be 2 finite numbers summing to 1"),
    ([{"into": 0, "experts": [0, 9], "weights": [0.5, 0.5]}], "expert ids [9] out of range 0..7"),
    ([{"into": 0, "experts": [0, 1], "weights": [0.5, 0.5]}], "keeps 1 experts but the router selects top_k=2"),
    ([{"into": 0, "experts": [0, 1], "weights": [0.5, 0.5], "perms": [None, [0, 0]]},
      {"into": 2, "experts": [2], "weights": [1.0]}], "a permutation must reorder all 64 intermediate units"),
])
def test_invalid_merges_name_the_problem(groups, message):
    view = MoEView(tiny_model("mixtral"))
    with pytest.raises(MoEError, match="invalid expert merge") as info:
        validate_merge(view, {view.indices[0]: groups})
    assert message in str(info.value)


def test_groups_may_not_cross_routing_groups():
    view = MoEView(tiny_model("deepseek_v3"))  # 2 routing groups of 4
    groups = [{"into": 0, "experts": [0, 4], "weights": [0.5, 0.5]},
              *({"into": e, "experts": [e], "weights": [1.0]} for e in (1, 5, 6))]
    with pytest.raises(MoEError, match="span routing groups of 4"):
        validate_merge(view, {view.indices[0]: groups})


def test_mask_mode_refuses_a_merge_plan():
    model = tiny_model("mixtral")
    groups = {i: [{"into": e, "experts": [e], "weights": [1.0]} for e in range(6)] for i in MoEView(model).indices}
    plan = Plan("m_smoe", "merge", merge=groups, keep={i: list(range(6)) for i in groups})
    with pytest.raises(MoEError, match=r"apply=mask\) cannot express; use apply=physical"):
        apply(model, plan, mode="mask")


def _pairs_per_routing_group(layer) -> list[dict]:
    """In each routing group: first + last merged aligned with averaged router rows, second + second-last
    merged plainly, the rest kept as they are."""
    n_group = layer.groups[0] if layer.groups else 1
    size, out = layer.num_experts // n_group, []
    for g in range(n_group):
        ids = list(range(g * size, (g + 1) * size))
        out.append({"into": ids[0], "experts": [ids[0], ids[-1]], "weights": [0.4, 0.6], "router": [0.5, 0.5],
                    "perms": [None, match_units(layer, ids[0], ids[-1])]})
        out.append({"into": ids[1], "experts": [ids[1], ids[-2]], "weights": [0.5, 0.5]})
        out += [{"into": e, "experts": [e], "weights": [1.0]} for e in ids[2:-2]]
    return out


def test_merged_checkpoints_load_in_plain_transformers(tmp_path):
    """Merged (weighted, aligned, averaged router rows) -> save_pretrained -> a fresh process without moebench."""
    expected = {}
    for family in FAMILIES:
        model = tiny_model(family)
        view = MoEView(model)
        groups = {layer.index: _pairs_per_routing_group(layer) for layer in view.layers}
        merge(model, groups)
        assert set(MoEView(model).experts_per_layer.values()) == {6 if not view.layers[0].groups else 4}
        model.save_pretrained(tmp_path / family)
        expected[family] = logits(model).tolist()
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tiny_models import sample_ids
worst = {{}}
for family, ref in json.load(open({str(tmp_path / 'expected.json')!r})).items():
    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + family).eval()
    with torch.no_grad():
        worst[family] = (m(sample_ids()).logits - torch.tensor(ref)).abs().max().item()
assert 'moebench' not in sys.modules
print(json.dumps(worst))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(worst) == set(FAMILIES) and all(diff == 0.0 for diff in worst.values()), worst
