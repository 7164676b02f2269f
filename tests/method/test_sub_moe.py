"""Sub-MoE against the REAP authors' ``--merge-method submoe``, rebuilt here in float64 on a tiny Mixtral.

The reference follows CerebrasResearch/reap (``experiments/submoe_v2.sh``: characteristic activations,
``--cluster-method kmeans --multi-layer 2``; ``cluster.py`` ``KMeansCostTableV2`` and
``multi_layer_kmeans_clustering_on_ca``; ``merge.py`` ``MoEExpertMerger`` with ``submoe``), written afresh:
unit-normalised mean expert outputs; per layer and per number of merges m, SciPy's k-means++ into E - m
clusters and its cost (sum of L2 distances to the centres); merges handed out one at a time to the layer
of the pair whose next cost is lowest; per cluster, for w1 (gate), w3 (up) and w2 (down) separately, the
dominant expert's weight and the others' (by id) concatenated along the input axis, one SVD, Vh read as
[n, K, in], frequency-weighted sum, U diag(S) times it, written into every member's slot; the router keeps
its E rows. The k-means draws use moebench's seeding (the authors' are unseeded). The experts come in four
deliberately similar pairs, so the clusters are plain.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.cluster.vq import kmeans2
from test_merging_authors import (
    CALIB,
    AuthorsBlock,
    AuthorsExpert,
    counts_and_means,
    logits_of,
    routing_pass,
    streamed_copy,
)
from tiny_models import tiny_model

from moebench.calib.stats import CollectSettings, collect
from moebench.method.apply import apply
from moebench.method.pipeline import plan_from_stats
from moebench.method.registry import get_method, resolve_budget
from moebench.moe.merge import merge
from moebench.moe.view import MoEError, MoEView

PAIRS = [[0, 1], [2, 3], [4, 5], [6, 7]]


def paired_mixtral():
    """A tiny Mixtral whose odd experts are their even neighbour plus 10% noise: four clear pairs."""
    model = tiny_model("mixtral")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in MoEView(model).layers:
            for t in layer.expert_tensors().values():
                for e in (1, 3, 5, 7):
                    t[e] = t[e - 1] * (1 + 0.05 * e) + 0.1 * t[e - 1].std() * torch.randn(t[e].shape, generator=g)
    return model


def plan_for(model, params=None, ratio=0.5):
    view = MoEView(model)
    stats = collect(model, CALIB, ["routing", "expert_means"], CollectSettings(), progress=False)
    return plan_from_stats(view, "sub_moe", params or {}, resolve_budget(view, ratio=ratio), stats, ratio=ratio)


# ----- the authors' clustering and merge, float64 ------------------------------------------------

def authors_clusters(means: dict[int, torch.Tensor], n_clusters: int) -> dict[int, list[list[int]]]:
    """multi_layer_kmeans_clustering_on_ca with --multi-layer 2 (seeded as moebench seeds: seed 0)."""
    out, layers = {}, sorted(means)
    for start in range(0, len(layers), 2):
        window = layers[start:start + 2]
        tables = {}
        for i in window:
            ca = (means[i] / means[i].norm(dim=-1, keepdim=True)).detach().numpy()
            n = ca.shape[0]
            tables[i] = []
            for m in range(1, n):  # the authors tabulate every count down to one cluster
                with warnings.catch_warnings(record=True) as empty:
                    warnings.simplefilter("always")
                    centres, labels = kmeans2(ca, n - m, minit="++", rng=np.random.default_rng([0, i, 0, n - m]))
                cost = float(np.linalg.norm(ca - centres[labels], axis=1).sum())
                tables[i].append((cost, labels, bool(empty)))
        done = dict.fromkeys(window, 0)
        for _ in range(sum(len(means[i]) for i in window) - n_clusters * len(window)):
            best = min(window, key=lambda i: (tables[i][done[i]][0] if done[i] < len(tables[i]) else np.inf, i))
            done[best] += 1
        for i in window:
            assert not (done[i] and tables[i][done[i] - 1][2]), "an empty cluster: the reference does not cover it"
            labels = tables[i][done[i] - 1][1] if done[i] else np.arange(len(means[i]))
            out[i] = sorted(sorted(int(e) for e in np.flatnonzero(labels == c)) for c in np.unique(labels))
    return out


def authors_submoe(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """merge.py ``submoe``: weights normalised, joint SVD of [W_1 .. W_n] (columns), Vh read as [n, K, in]."""
    weights = weights / weights.sum()
    u, s, vh = torch.linalg.svd(torch.cat(tensors, dim=1), full_matrices=False)
    blocks = vh.reshape(len(tensors), vh.shape[0], -1)
    return (u @ torch.diag(s)) @ sum(w * b for w, b in zip(weights, blocks, strict=True))


def authors_model(base, clusters, proba):
    """``base`` in float64, every MoE block merged by ``authors_submoe`` (each member slot: its cluster's module)."""
    import copy

    model = copy.deepcopy(base).double()
    for layer in MoEView(model).layers:
        gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
        units = down.shape[2]
        w1, w3, w2 = gate_up[:, :units], gate_up[:, units:], down
        slots = [None] * gate_up.shape[0]
        for members in clusters[layer.index]:
            p = proba[layer.index]
            dom = members[int(torch.argmax(p[members]))]
            order = [dom] + [e for e in members if e != dom]
            merged = [authors_submoe([t[e] for e in order], p[order]) if len(order) > 1 else t[dom]
                      for t in (w1, w2, w3)]
            module = AuthorsExpert(*merged)
            for e in members:
                slots[e] = module
        model.model.layers[layer.index].mlp = AuthorsBlock(layer.router.weight.detach().double(), slots, layer.top_k)
    return model


@pytest.fixture(scope="module")
def case():
    base = paired_mixtral()
    plan = plan_for(base)
    stats = counts_and_means(base, routing_pass(base))
    proba = {i: counts / counts.sum() for i, (counts, _) in stats.items()}
    clusters = authors_clusters({i: means for i, (_, means) in stats.items()}, 4)
    model = paired_mixtral()
    apply(model, plan)
    return base, plan, clusters, proba, model


# ----- tests ------------------------------------------------------------------------------------

def test_the_clusters_are_the_authors_and_the_pairs(case):
    _, plan, clusters, _, _ = case
    assert plan.params == {"layers": 2, "split": "reshape", "rank": 0, "seed": 0}
    for index, groups in plan.merge.items():
        assert sorted(g["experts"] for g in groups) == clusters[index] == PAIRS
        assert all(g["svd"] == {"split": "reshape", "rank": 0} for g in groups)
    assert plan.expert_map is not None  # all E router rows kept


def test_merged_weights_and_logits_equal_the_authors(case):
    """float32 moebench vs the float64 reference: weights and logits within 1e-5."""
    base, plan, clusters, proba, model = case
    authors = authors_model(base, clusters, proba)
    ref_layers = {i: authors.model.layers[i].mlp for i in plan.merge}
    for index in plan.merge:
        experts = MoEView(model).layer(index).experts
        units = experts.down_proj.shape[2]
        for g in plan.merge[index]:
            slot, ref = plan.keep[index].index(g["into"]), ref_layers[index].experts[g["into"]]
            torch.testing.assert_close(experts.gate_up_proj[slot, :units].double(), ref.w1.detach(), rtol=1e-5,
                                       atol=1e-6)
            torch.testing.assert_close(experts.gate_up_proj[slot, units:].double(), ref.w3.detach(), rtol=1e-5,
                                       atol=1e-6)
            torch.testing.assert_close(experts.down_proj[slot].double(), ref.w2.detach(), rtol=1e-5, atol=1e-6)
    reference = logits_of(authors)
    worst = float((logits_of(model) - reference).abs().max())
    print(f"sub_moe: float32 vs the authors' float64 {worst:.2e} (logits up to {float(reference.abs().max()):.2f})")
    assert worst < 1e-5, worst


def test_the_reshape_is_not_the_average_but_columns_untruncated_is(case):
    base, plan, _, _, model = case
    columns = paired_mixtral()
    apply(columns, plan_for(base, {"split": "columns"}))
    view, out = MoEView(base), MoEView(columns)
    for index, groups in plan.merge.items():
        for g in groups:
            slot = plan.keep[index].index(g["into"])
            for name, t in out.layer(index).expert_tensors().items():
                average = sum(w * view.layer(index).expert_tensors()[name][e].double()
                              for e, w in zip(g["experts"], g["weights"], strict=True))
                torch.testing.assert_close(t[slot].double(), average, rtol=1e-5, atol=1e-6)
                reshaped = MoEView(model).layer(index).expert_tensors()[name][slot].double()
                assert (reshaped - average).abs().max() > 1e-3  # the authors' reading of Vh is another merge


def test_rank_rule_full_by_default_and_truncated_on_request(case):
    base, plan, _, _, _ = case
    for ranks in plan.extra["svd_rank"].values():  # untruncated: K = min(out, n*in) per projection
        assert ranks == [{"gate": 64, "up": 64, "down": 32}] * 4  # gate/up [64, 32] x 2, down [32, 64] x 2
    truncated = plan_for(base, {"rank": 3, "split": "columns"})
    assert all(r == {"gate": 3, "up": 3, "down": 3} for ranks in truncated.extra["svd_rank"].values() for r in ranks)
    model = paired_mixtral()
    apply(model, truncated)
    for layer in MoEView(model).layers:
        units = layer.experts.down_proj.shape[2]
        for slot in range(layer.num_experts):
            assert int(torch.linalg.matrix_rank(layer.experts.gate_up_proj[slot, :units].double(), rtol=1e-5)) <= 3
            assert int(torch.linalg.matrix_rank(layer.experts.down_proj[slot].double(), rtol=1e-5)) <= 3


def test_one_layer_at_a_time_keeps_the_budget_per_layer():
    base = paired_mixtral()
    plan = plan_for(base, {"layers": 1}, ratio=0.25)
    assert plan.keep.keys() == {0, 1} and all(len(k) == 6 for k in plan.keep.values())


@pytest.mark.parametrize("params, match", [({"layers": 0}, "layers"), ({"rank": -1}, "rank"),
                                           ({"split": "rows"}, "split")])
def test_bad_parameters_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        get_method("sub_moe").parse_params(params)


def test_bad_svd_groups_are_refused():
    model = tiny_model("mixtral")
    group = {"into": 0, "experts": [0, 1], "weights": [0.5, 0.5], "svd": {"split": "rows", "rank": 0}}
    with pytest.raises(MoEError, match="svd"):
        merge(model, {0: [group] + [{"into": e, "experts": [e], "weights": [1.0]} for e in range(2, 8)]})
    group = {**group, "svd": {"split": "columns", "rank": 0}, "perms": [None, list(range(64))]}
    with pytest.raises(MoEError, match="no perms"):
        merge(model, {0: [group] + [{"into": e, "experts": [e], "weights": [1.0]} for e in range(2, 8)]})


@pytest.mark.parametrize("layout", ["compact", "duplicated"])
def test_layer_by_layer_writer_gives_the_same_model(case, layout, tmp_path):
    """The --sequential path does the SVD merges on the streamed shards and writes the in-memory merge's model."""
    base, plan, _, _, model = case
    written = streamed_copy(base, plan, tmp_path, layout)
    torch.testing.assert_close(logits_of(written), logits_of(model), rtol=0, atol=1e-5)
