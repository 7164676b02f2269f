"""HC-SMoE and M-SMoE against the authors' merged model, rebuilt here in float64 on a tiny Mixtral.

The reference follows the structure of both authors' repositories (HC-SMoE ``grouping_mixtral.py``,
MC-SMoE ``merging/grouping_mixtral.py``), written afresh: frequencies are each expert's share of the
layer's top-2 selections; a group's merged expert is sum_i f_i W_i / (sum_i f_i + eps) (their code:
eps = 1e-7), written into the group's lowest id; every member's slot of an E-long expert list is that
very module; the router keeps its E rows; the block loops over the E slots and adds each routed token's
gated output (two members of one group: the merged expert twice, each with its gate). The groups are
computed here too, from a routing pass of our own: HC-SMoE's k-means (k-means++ start, per-centre
standardised distances) on the experts' mean outputs, M-SMoE's dominant experts and router-logit cosine.
moebench's default (``router=all``) must give the reference's logits; so must its checkpoints.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tokenizer
from tiny_models import sample_ids, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from moebench.calib.stats import CollectSettings, collect
from moebench.method.apply import apply
from moebench.method.pipeline import plan_from_stats
from moebench.method.plan import Plan
from moebench.method.registry import resolve_budget
from moebench.moe.checkpoint import ExpertMapCheckpointWarning, load_model, save_pruned
from moebench.moe.expert_map import MAP_KEY
from moebench.moe.view import MoEView

CALIB = sample_ids(4, 16)
EVAL = sample_ids(3, 20, seed=7)
AUTHORS_EPS = 1e-7


# ----- the authors' structure, float64 --------------------------------------------------------

class AuthorsExpert(nn.Module):
    """One Mixtral expert as the authors' code holds it: w2(silu(w1 x) * w3 x)."""

    def __init__(self, w1, w2, w3):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Parameter(w1), nn.Parameter(w2), nn.Parameter(w3)

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


class AuthorsBlock(nn.Module):
    """A Mixtral MoE block whose E expert slots may hold the same module (transformers 4.x's loop)."""

    def __init__(self, router_rows, experts, top_k):
        super().__init__()
        self.gate = nn.Linear(router_rows.shape[1], router_rows.shape[0], bias=False, dtype=router_rows.dtype)
        self.gate.weight = nn.Parameter(router_rows.clone())
        self.experts, self.top_k = nn.ModuleList(experts), top_k
        self.repeats = 0  # routed tokens whose top-k hold two slots of one module

    def forward(self, hidden):
        x = hidden.reshape(-1, hidden.shape[-1])
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # Mixtral's router: softmax in float32
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for slot, expert in enumerate(self.experts):
            rows, pos = torch.where(chosen == slot)
            out.index_add_(0, rows, weights[rows, pos, None] * expert(x[rows]))
        modules = [[id(self.experts[int(i)]) for i in row] for row in chosen]
        self.repeats += sum(len(set(m)) < len(m) for m in modules)
        return out.view_as(hidden)


def authors_model(base, groups: dict[int, list[list[int]]], shares: dict[int, torch.Tensor], eps: float):
    """``base`` (float64 copy) with every MoE block merged the authors' way: per layer, ``groups`` (lists of expert
    ids), ``shares [E]`` the usage frequencies."""
    model = copy.deepcopy(base).double()
    for layer in MoEView(model).layers:
        gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
        units = down.shape[2]
        slots: list = [None] * gate_up.shape[0]
        for members in groups[layer.index]:
            f = shares[layer.index][members].double()
            up, dn = (sum(fi * t[e] for fi, e in zip(f, members, strict=True)) / (f.sum() + eps)
                      for t in (gate_up, down))
            merged = AuthorsExpert(up[:units], dn, up[units:])
            for e in members:
                slots[e] = merged  # one module behind every member's slot
        assert all(s is not None for s in slots)
        model.model.layers[layer.index].mlp = AuthorsBlock(layer.router.weight.detach().double(), slots, layer.top_k)
    return model


def logits_of(model, ids=EVAL) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


# ----- the grouping, from a routing pass of our own ---------------------------------------------

def routing_pass(model) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer: router logits ``[N, E]`` and MoE inputs ``[N, H]`` on the calibration tokens."""
    seen, hooks = {}, []
    for layer in MoEView(model).layers:
        seen[layer.index] = {}
        hooks.append(layer.router.register_forward_hook(
            lambda m, a, out, i=layer.index: seen[i].__setitem__("logits", out[0].detach().double())))
        hooks.append(layer.block.register_forward_pre_hook(
            lambda m, a, i=layer.index: seen[i].__setitem__("inputs", a[0].detach().reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=CALIB)
    for h in hooks:
        h.remove()
    return seen


def counts_and_means(model, seen):
    """Top-2 selection counts ``[E]`` and every expert's mean output over all tokens ``[E, H]``, per layer."""
    out = {}
    for layer in MoEView(model).layers:
        logits, x = seen[layer.index]["logits"], seen[layer.index]["inputs"].double()
        counts = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=logits.shape[1]).double()
        gate_up, down = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
        units = down.shape[2]
        means = torch.stack([F.linear(F.silu(x @ gate_up[e, :units].T) * (x @ gate_up[e, units:].T), down[e]).mean(0)
                             for e in range(gate_up.shape[0])])
        out[layer.index] = (counts, means)
    return out


def authors_kmeans(points: torch.Tensor, k: int, g: torch.Generator) -> list[list[int]]:
    """HC-SMoE's k-means: k-means++ start, then assign by per-centre standardised distance, centres to means."""
    n, dim = points.shape
    picked = [int(torch.randint(0, n, (1,), generator=g))]
    while len(picked) < k:
        nearest = torch.stack([torch.linalg.vector_norm(points - points[c], dim=1) for c in picked], 1).min(1).values
        weights = nearest ** 2
        picked.append(int(torch.multinomial(weights / weights.sum(), 1, generator=g)))
    centres = points[picked]
    for _ in range(100):
        dist = torch.cdist(points, centres) / dim
        z = (dist - dist.mean(dim=0)) / (dist.std(dim=0) + 1e-6)
        z = z - z.min()
        label = z.argmin(dim=1)
        new = torch.stack([points[label == c].mean(0) for c in range(k)])
        assert torch.isfinite(new).all(), "an empty cluster: the reference does not cover it"
        done = (new - centres).abs().max() < 1e-4
        centres = new
        if done:
            break
    return [[i for i in range(n) if label[i] == c] for c in range(k)]


def partition(groups) -> set[frozenset]:
    return {frozenset(g) for g in groups}


def plan_for(model, name, params=None, ratio=0.5):
    view = MoEView(model)
    stats = collect(model, CALIB, ["routing", "router_gram", "expert_means"], CollectSettings(), progress=False)
    return plan_from_stats(view, name, params or {}, resolve_budget(view, ratio=ratio), stats, ratio=ratio), stats


def reference_groups(base, name: str, plan: Plan) -> tuple[dict, dict, dict]:
    """The reference's groups, usage shares and selection counts per layer (M-SMoE's per-layer counts taken from
    the plan, whose global allocation tests/method/test_merging.py checks)."""
    seen = routing_pass(base)
    stats = counts_and_means(base, seen)
    groups, shares, all_counts = {}, {}, {}
    for index, (counts, means) in stats.items():
        all_counts[index] = counts
        shares[index] = counts / counts.sum()
        if name == "hc_smoe":
            generator = torch.Generator().manual_seed(0 * 100_003 + index)  # moebench's seeding (seed=0)
            groups[index] = authors_kmeans(means, len(plan.keep[index]), generator)
        else:
            dominant = sorted(torch.sort(-counts, stable=True).indices[:len(plan.keep[index])].tolist())
            cols = F.normalize(seen[index]["logits"], dim=0)
            cos = cols.T @ cols
            members = {d: [d] for d in dominant}
            for e in range(counts.numel()):
                if e not in members:
                    members[dominant[int(torch.argmax(cos[e, dominant]))]].append(e)
            groups[index] = list(members.values())
    return groups, shares, all_counts


# ----- tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["hc_smoe", "m_smoe"])
def merged(request):
    """(method, base model, plan, reference groups, shares, moebench's merged float32 model)."""
    name = request.param
    base = tiny_model("mixtral")
    plan, stats = plan_for(base, name)
    groups, shares, counts = reference_groups(base, name, plan)
    for index in plan.merge:  # the routing pass agrees with moebench's statistics
        assert torch.equal(stats[index]["counts"].double(), counts[index])
    model = tiny_model("mixtral")
    apply(model, plan)
    return name, base, plan, groups, shares, model


def test_default_keeps_every_router_row_and_the_groups_are_the_authors(merged):
    name, base, plan, groups, _, model = merged
    assert plan.params["router"] == "all" and plan.expert_map is not None
    for index, layer_groups in plan.merge.items():
        assert partition(g["experts"] for g in layer_groups) == partition(groups[index])
        layer = MoEView(model).layer(index)
        assert layer.router.weight.shape[0] == 8 and torch.equal(
            layer.router.weight, MoEView(base).layer(index).router.weight)  # the router as it was
        assert layer.num_experts == len(layer_groups) == layer.experts.gate_up_proj.shape[0]  # merged experts once
        for g in layer_groups:
            assert {plan.expert_map[index][e] for e in g["experts"]} == {plan.keep[index].index(g["into"])}
    if name == "hc_smoe":
        assert plan.params["cluster"] == "kmeans" and plan.params["seed"] == 0


def test_logits_equal_the_authors_merged_model(merged):
    """float32 moebench vs the float64 reference (their 1e-7 included): within 1e-5; float64 moebench vs the
    reference without the 1e-7: within 1e-10. The measured differences are printed."""
    name, base, plan, groups, shares, model = merged
    authors = authors_model(base, groups, shares, AUTHORS_EPS)
    reference = logits_of(authors)
    assert sum(block.repeats for block in (authors.model.layers[i].mlp for i in plan.merge)) > 0  # gates add up
    ours = logits_of(model)
    worst32 = float((ours - reference).abs().max())
    assert worst32 < 1e-5, worst32
    model64 = tiny_model("mixtral").double()
    model64.set_experts_implementation("eager")  # grouped_mm takes no float64
    apply(model64, plan)
    exact = logits_of(authors_model(base, groups, shares, 0.0))
    worst64 = float((logits_of(model64) - exact).abs().max())
    with_eps = float((logits_of(model64) - reference).abs().max())
    print(f"{name}: float32 vs authors {worst32:.2e}; float64 vs reference without 1e-7 {worst64:.2e}, "
          f"with it {with_eps:.2e}")
    assert worst64 < 1e-10, worst64
    assert with_eps < 1e-5, with_eps


@pytest.mark.parametrize("kernel", ["eager", "grouped_mm", "batched_mm", "moebench"])
def test_every_experts_kernel_adds_the_gates_of_one_group(merged, kernel):
    """Two chosen members of one group dispatch the same merged expert twice; every kernel sums both."""
    from moebench.moe.kernels import experts_kernel, register

    _, base, _, groups, shares, model = merged
    register()
    reference = logits_of(authors_model(base, groups, shares, 0.0))
    with experts_kernel(model, kernel):
        torch.testing.assert_close(logits_of(model), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("router", ["dominant", "average"])
def test_one_row_options_still_cut_the_router(router):
    base = tiny_model("mixtral")
    plan, _ = plan_for(base, "hc_smoe", {"router": router})
    assert plan.expert_map is None
    model = tiny_model("mixtral")
    apply(model, plan)
    for index, layer_groups in plan.merge.items():
        layer = MoEView(model).layer(index)
        assert layer.expert_map is None and layer.router.weight.shape[0] == layer.num_experts == len(layer_groups)
        rows = MoEView(base).layer(index).router.weight.detach()
        for slot, g in enumerate(sorted(layer_groups, key=lambda g: g["into"])):
            expected = rows[g["into"]] if router == "dominant" else sum(
                w * rows[e] for e, w in zip(g["experts"], g["weights"], strict=True))
            torch.testing.assert_close(layer.router.weight[slot].detach(), expected)
    out = logits_of(model)
    assert torch.isfinite(out).all()
    full, _ = plan_for(base, "hc_smoe")
    keeping = tiny_model("mixtral")
    apply(keeping, full)
    assert not torch.allclose(out, logits_of(keeping), atol=1e-3)


def test_the_plan_records_the_map_and_round_trips(merged, tmp_path):
    _, _, plan, _, _, _ = merged
    plan.save(str(tmp_path / "plan.json"))
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["expert_map"] == {str(i): m for i, m in plan.expert_map.items()}
    again = Plan.load(str(tmp_path / "plan.json"))
    assert again.expert_map == plan.expert_map and again.to_json() == plan.to_json()
    older = {k: v for k, v in data.items() if k != "expert_map"}  # a plan.json from before the field
    (tmp_path / "old.json").write_text(json.dumps(older))
    old = Plan.load(str(tmp_path / "old.json"))
    assert old.expert_map is None and "expert_map" not in json.loads(old.to_json())


def test_compact_checkpoint_round_trips_with_moebench_only(merged, tmp_path):
    from moebench.eval.model import PrunedMoELM

    _, _, plan, _, _, model = merged
    folder = tmp_path / "compact"
    with pytest.warns(ExpertMapCheckpointWarning, match="plain transformers and vLLM cannot load it"):
        save_pruned(model, str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config[MAP_KEY] == {str(i): m for i, m in plan.expert_map.items()} and config["num_local_experts"] == 8
    loaded = load_model(str(folder))
    assert MoEView(loaded).experts_per_layer == MoEView(model).experts_per_layer
    assert torch.equal(logits_of(loaded), logits_of(model))
    with pytest.raises(RuntimeError, match="mismatched_sizes"):  # plain transformers refuses, loudly
        AutoModelForCausalLM.from_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = PrunedMoELM(pretrained=str(folder), method="none", device="cpu")
    assert MoEView(lm.model).layers[0].expert_map is not None
    assert torch.equal(logits_of(lm.model), logits_of(model))


def test_duplicated_checkpoint_is_plain_transformers(merged, tmp_path):
    _, _, plan, _, _, model = merged
    before = logits_of(model)
    save_pruned(model, str(tmp_path / "dup"), layout="duplicated")
    assert MoEView(model).layers[0].expert_map is not None and torch.equal(logits_of(model), before)  # unchanged
    config = json.loads((tmp_path / "dup" / "config.json").read_text())
    assert MAP_KEY not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dup").eval()
    view = MoEView(plain)
    assert set(view.experts_per_layer.values()) == {8} and all(layer.expert_map is None for layer in view.layers)
    for index, mapping in plan.expert_map.items():  # slot e holds a copy of merged expert map[e]
        experts = view.layer(index).experts.gate_up_proj
        merged_experts = MoEView(model).layer(index).experts.gate_up_proj
        assert all(torch.equal(experts[e], merged_experts[m]) for e, m in enumerate(mapping))
    torch.testing.assert_close(logits_of(plain), before, rtol=0, atol=1e-5)


def streamed_copy(base, plan: Plan, folder, layout: str):
    """The --sequential path: ``plan`` applied to a meta skeleton of ``base`` (saved under ``folder``/base), the
    checkpoint streamed from its shards into ``folder``/``layout`` and loaded back (compact through moebench,
    duplicated through plain transformers)."""
    from moebench.moe.layered import LayeredCheckpoint
    from moebench.moe.streaming import save_streaming

    base.save_pretrained(folder / "base")
    skeleton = LayeredCheckpoint(str(folder / "base"))
    apply(skeleton.model, plan)
    save_streaming(LayeredCheckpoint(str(folder / "base")), plan.keep, str(folder / layout),
                   skeleton.model.config, merge=plan.merge, expert_map=plan.expert_map, layout=layout)
    if layout == "compact":
        return load_model(str(folder / layout))
    return AutoModelForCausalLM.from_pretrained(folder / layout).eval()


@pytest.mark.parametrize("layout", ["compact", "duplicated"])
def test_layer_by_layer_writer_gives_the_same_model(merged, layout, tmp_path):
    """The --sequential path writes the model the in-memory merge computes, in either layout."""
    _, base, plan, _, _, model = merged
    written = streamed_copy(base, plan, tmp_path, layout)
    torch.testing.assert_close(logits_of(written), logits_of(model), rtol=0, atol=1e-5)


def test_every_family_routes_all_rows_to_the_merged_experts(family):
    """On every family (softmax / sigmoid, renormalised or not, correction bias, group-limited routing, Llama4's
    dense gated inputs) the merged layer routes as the base router does, each slot to its merged expert: it
    computes what the authors' structure written out (E experts, copies; transformers' own block) computes."""
    from moebench.moe.expert_map import expand

    base = tiny_model(family)
    plan, _ = plan_for(base, "m_smoe")
    model = tiny_model(family)
    apply(model, plan)
    hidden = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    for index, mapping in plan.expert_map.items():
        with torch.no_grad():
            theirs, ours = MoEView(base).layer(index).route(hidden), MoEView(model).layer(index).route(hidden)
        assert torch.equal(ours.indices, torch.tensor(mapping)[theirs.indices])
        torch.testing.assert_close(ours.weights, theirs.weights)
    ids = sample_ids(2, 12)
    compact = logits_of(model, ids)
    expand(model)  # in place: E experts, no map, no hooks
    assert all(layer.expert_map is None for layer in MoEView(model).layers)
    torch.testing.assert_close(logits_of(model, ids), compact, rtol=0, atol=1e-5)


def test_maps_that_are_not_the_groups_are_refused():
    from moebench.moe.merge import merge, validate_merge
    from moebench.moe.ops import prune
    from moebench.moe.view import MoEError

    model = tiny_model("mixtral")
    view = MoEView(model)
    index = view.indices[0]
    groups = [{"into": 0, "experts": [0, 1, 2, 3], "weights": [0.25] * 4},
              {"into": 4, "experts": [4, 5, 6, 7], "weights": [0.25] * 4}]
    for maps, message in [({index: [0, 0, 0, 0, 1, 1, 1, 0]}, "is not its groups'"),
                          ({index: [0] * 4 + [1] * 4, 99: [0] * 8}, "layer 99: an expert map needs")]:
        with pytest.raises(MoEError, match=message):
            validate_merge(view, {index: groups}, maps)
    with pytest.raises(MoEError, match=r"experts \[7\] are in no group"):
        validate_merge(view, {index: [groups[0], {"into": 4, "experts": [4, 5, 6], "weights": [0.5, 0.25, 0.25]}]},
                       {index: [0] * 4 + [1] * 3 + [-1]})
    with pytest.raises(MoEError, match="carry router coefficients"):
        validate_merge(view, {index: [{**g, "router": g["weights"]} for g in groups]}, {index: [0] * 4 + [1] * 4})
    merge(model, {index: groups}, {index: [0] * 4 + [1] * 4})
    with pytest.raises(MoEError, match="were merged already"):
        merge(model, {index: groups}, {index: [0] * 4 + [1] * 4})
    with pytest.raises(MoEError, match=r"cannot be pruned by expert ids"):
        prune(model, {index: [0]})
