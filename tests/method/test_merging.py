"""HC-SMoE and M-SMoE against independent computations: clustering, dominant experts, router-logit
similarity, the global budget, alignment and router options."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moebench.calib.stats import CollectSettings, collect
from moebench.method.merging import agglomerate
from moebench.method.pipeline import plan_from_stats
from moebench.method.registry import resolve_budget
from moebench.moe.view import MoEView

IDS = sample_ids(4, 16)
GROUPS = ["routing", "router_gram", "expert_means", "logits"]


def planned(model, name, params=None, ratio=0.5, **kw):
    view = MoEView(model)
    stats = collect(model, IDS, GROUPS, CollectSettings(), progress=False)
    return plan_from_stats(view, name, params or {}, resolve_budget(view, ratio=ratio), stats, ratio=ratio, **kw), stats


def partition(groups) -> set[frozenset]:
    return {frozenset(g) for g in groups}


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
def test_agglomerate_equals_scipy(linkage):
    from scipy.cluster.hierarchy import cut_tree
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import pdist

    points = torch.randn(12, 5, generator=torch.Generator().manual_seed(4)).double()
    for k in (2, 5, 9):
        ours = agglomerate(torch.cdist(points, points), k, linkage)
        labels = cut_tree(scipy_linkage(pdist(points.numpy()), method=linkage), n_clusters=k)[:, 0]
        theirs = [[i for i in range(12) if labels[i] == c] for c in set(labels)]
        assert len(ours) == k and partition(ours) == partition(theirs)


def test_hc_smoe_clusters_identical_experts_together():
    model = tiny_model("mixtral")
    with torch.no_grad():
        for layer in MoEView(model).layers:
            for t in layer.expert_tensors().values():
                t.data[3], t.data[5] = t.data[0], t.data[0]
    plan, stats = planned(model, "hc_smoe", ratio=0.25)  # 6 clusters: two joins, both at distance 0
    for index, groups in plan.merge.items():
        assert partition(g["experts"] for g in groups) == partition([[0, 3, 5], [1], [2], [4], [6], [7]])
        counts = stats[index]["counts"]
        trio = next(g for g in groups if len(g["experts"]) == 3)
        torch.testing.assert_close(torch.tensor(trio["weights"]).double(), counts[[0, 3, 5]] / counts[[0, 3, 5]].sum())
        assert trio["into"] == [0, 3, 5][int(torch.argmax(counts[[0, 3, 5]]))]


def dense_logits(stats_layer) -> torch.Tensor:
    """``[N, E]`` router logits rebuilt from the logits group (top-16 of 8 experts: all of them)."""
    top, ids = stats_layer["topk_logits"], stats_layer["topk_ids"]
    return torch.zeros(top.shape[0], 8).scatter_(1, ids, top).double()


def test_m_smoe_per_layer_follows_frequency_and_logit_similarity():
    plan, stats = planned(tiny_model("qwen3_moe"), "m_smoe", {"scope": "layer", "align": False})
    for index, groups in plan.merge.items():
        counts = stats[index]["counts"]
        dominant = sorted(torch.sort(-counts, stable=True).indices[:4].tolist())
        assert plan.keep[index] == dominant
        cols = torch.nn.functional.normalize(dense_logits(stats[index]), dim=0)
        cos = cols.T @ cols
        for g in groups:
            for e in g["experts"]:
                if e != g["into"]:
                    assert dominant[int(torch.argmax(cos[e, dominant]))] == g["into"]
            assert "perms" not in g and "router" not in g


def test_m_smoe_global_budget_is_a_threshold_on_normalised_frequency():
    model = tiny_model("mixtral", num_hidden_layers=4)
    plan, stats = planned(model, "m_smoe", {"align": False})
    view = MoEView(model)
    total = sum(resolve_budget(view, ratio=0.5).values())
    # independent: each layer keeps top_k, the rest of the total goes to the highest shares left anywhere
    # (equal shares: the lower layer first)
    shares = {i: stats[i]["counts"] / stats[i]["counts"].sum() for i in view.indices}
    rest = sorted(((float(v), -i) for i in view.indices for v in shares[i].sort(descending=True).values[2:]),
                  reverse=True)[: total - 2 * len(view.indices)]
    expected = {i: 2 + sum(1 for _, j in rest if j == -i) for i in view.indices}
    assert plan.experts_kept() == expected and sum(expected.values()) == total
    assert len(set(expected.values())) > 1  # the layers really differ on this model


def test_m_smoe_global_keeps_equal_counts_per_routing_group():
    plan, _ = planned(tiny_model("deepseek_v3"), "m_smoe", {"align": False}, ratio=0.25)
    for ids in plan.keep.values():
        assert sum(i < 4 for i in ids) == sum(i >= 4 for i in ids)
    for groups in plan.merge.values():
        assert all(len({e // 4 for e in g["experts"]}) == 1 for g in groups)


def test_alignment_is_off_by_default_and_refused_with_its_estimate_where_unaffordable():
    from moebench.method.registry import get_method

    assert get_method("m_smoe").parse_params({})["align"] is False  # as the authors' Mixtral script
    wide = tiny_model("mixtral", intermediate_size=8192)
    view = MoEView(wide)
    with pytest.raises(ValueError, match=r"8192 x 8192 assignment per merged expert, O\(I\^3\): at least ~\d+ min"):
        plan_from_stats(view, "m_smoe", {"align": True}, resolve_budget(view, ratio=0.5), {}, ratio=0.5)


def test_alignment_and_router_options_are_recorded_and_change_the_model():
    model = tiny_model("olmoe")
    aligned, _ = planned(model, "m_smoe", {"scope": "layer", "align": True})
    plain, _ = planned(model, "m_smoe", {"scope": "layer", "align": False})
    average, _ = planned(model, "hc_smoe", {"router": "average"})
    assert aligned.merge.keys() == plain.merge.keys()
    for index in aligned.merge:
        assert partition(g["experts"] for g in aligned.merge[index]) == partition(
            g["experts"] for g in plain.merge[index])
        perms = [p for g in aligned.merge[index] for p in g.get("perms", []) if p is not None]
        assert perms and all(sorted(p) == list(range(64)) for p in perms)
        assert any(p != list(range(64)) for p in perms)
        assert all(g.get("router") == g["weights"] for g in average.merge[index])


def test_merge_budget_errors_name_the_numbers():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match=r"leaves 1 experts but the router selects top_k=2"):
        planned(model, "hc_smoe", ratio=0.9)
    with pytest.raises(ValueError, match="linkage='ward' must be one of"):
        planned(model, "hc_smoe", {"linkage": "ward"})
