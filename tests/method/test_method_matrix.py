"""The method contract as a matrix: every registered method x every family, each a test of its own.

For each (method, family) the plan is made from real statistics of a tiny model, checked against the
budget, saved and loaded as JSON, applied with `moebench.method.apply.apply`, and the applied model
is run: finite logits of the right shape; a pruned model holds exactly the kept experts and computes
what the masked model computes; a merged model holds one expert per group whose tensors are the
group's weighted (aligned) average of the base model's experts (a subspace merge, Sub-MoE: the joint
SVD of the members' weights with merged V blocks, recomputed here in numpy); a select plan keeps the budget for
each input; the identity leaves the logits unchanged; the same plan applied from its JSON to a fresh
copy gives the same logits. Merge methods apply to all 12 families: with group-limited routing
(DeepSeek, GLM) groups stay inside one routing group; GPT-OSS's interleaved gate/up units and
Llama4's transposed experts are permuted along their own axes (tests/moe/test_merge.py).
Plans travel through `Plan.save` / `Plan.load` (MoNE's constants in ``novices.safetensors`` beside
plan.json). Methods that run the model on calibration text (EvoESAP's search) get the statistics'
token ids as ``calibration_tokens``; `PARAMS` shrinks their searches. A method that cannot serve a
family refuses it with a clear error: `REFUSED` names
each such pair and the reason its error must give (MoNE on Llama4: the gate scales the expert's
input, so there is no output gate to scale a constant with).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import FAMILIES, sample_ids, tiny_model

from moebench.calib.stats import GROUPS, CollectSettings, collect
from moebench.method.apply import apply
from moebench.method.pipeline import plan_from_stats
from moebench.method.plan import Plan
from moebench.method.registry import get_method, load_methods, resolve_budget
from moebench.moe.merge import permuted
from moebench.moe.view import MoEError, MoEView

METHODS = sorted(load_methods())
RATIO = 0.25
REFUSED = {("mone", "llama4_text"): "no output gate to scale a constant"}  # (method, family) -> the error's reason
PARAMS = {"evoesap": {"population": 4, "generations": 2, "init": "uniform,random,up"}}  # small searches, for speed
_STATS: dict[str, dict] = {}


def stats_of(family: str) -> dict:
    """Every statistic group of the tiny model of ``family`` (collected once per family)."""
    if family not in _STATS:
        model = tiny_model(family)
        _STATS[family] = collect(model, sample_ids(4, 16), GROUPS, CollectSettings(subsample_tokens=64),
                                 progress=False)
    return _STATS[family]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def make(family: str, name: str) -> Plan:
    model = tiny_model(family)
    view = MoEView(model)
    spec = get_method(name)
    budget = {} if spec.is_identity else resolve_budget(view, ratio=RATIO)
    return plan_from_stats(view, name, PARAMS.get(name, {}), budget, stats_of(family),
                           ratio=None if spec.is_identity else RATIO, extra={"calibration_tokens": sample_ids(4, 16)})


def check_merged(base, merged, plan: Plan) -> None:
    """Every kept expert of ``merged`` is its group's weighted average of ``base``'s (aligned) experts;
    the groups partition each layer's experts."""
    base_view, merged_view = MoEView(base), MoEView(merged)
    for index, groups in plan.merge.items():
        assert sorted(e for g in groups for e in g["experts"]) == list(range(base_view.layer(index).num_experts))
        layer, out = base_view.layer(index), merged_view.layer(index).expert_tensors()
        for g in groups:
            perms = g.get("perms") or [None] * len(g["experts"])
            slot = plan.keep[index].index(g["into"])
            if g.get("svd") is not None:
                check_subspace(layer, merged_view.layer(index), slot, g)
                continue
            for name, tensor in out.items():
                expected = sum(w * permuted(layer, e, p)[name].double()
                               for e, w, p in zip(g["experts"], g["weights"], perms, strict=True))
                torch.testing.assert_close(tensor[slot].double(), expected, rtol=1e-5, atol=1e-6)


def check_subspace(base_layer, merged_layer, slot: int, g: dict) -> None:
    """The merged expert in ``slot`` is U diag(S) sum_i w_i V_i of the joint SVD (`torch.linalg.svd`, as the
    authors: with ``split=reshape`` the result depends on its sign convention) of the members' [out, in]
    weights, ``into`` first, V_i cut from Vh as ``g["svd"]["split"]`` says."""
    from moebench.moe.subspace import linear_weights

    order = [g["into"]] + [e for e in g["experts"] if e != g["into"]]
    w = dict(zip(g["experts"], g["weights"], strict=True))
    got = linear_weights(merged_layer, slot)
    for name in ("gate", "up", "down"):
        mats = [linear_weights(base_layer, e)[name].double() for e in order]
        u, s, vh = torch.linalg.svd(torch.cat(mats, dim=1), full_matrices=False)
        r = g["svd"]["rank"] or len(s)
        u, s, vh = u[:, :r], s[:r], vh[:r]
        cols = mats[0].shape[1]
        if g["svd"]["split"] == "reshape":  # Vh's memory read as [n, r, in]
            flat = vh.reshape(-1)
            blocks = [flat[i * r * cols:(i + 1) * r * cols].view(r, cols) for i in range(len(mats))]
        else:
            blocks = [vh[:, i * cols:(i + 1) * cols] for i in range(len(mats))]
        expected = u @ torch.diag(s) @ sum(w[e] * b for e, b in zip(order, blocks, strict=True))
        torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-6)


def saved_and_loaded(plan: Plan, folder) -> Plan:
    """``plan`` written to ``folder/plan.json`` (and any file beside it) and read back."""
    folder.mkdir(exist_ok=True)
    plan.save(str(folder / "plan.json"))
    return Plan.load(str(folder / "plan.json"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_method_on_family(name, family, tmp_path):
    spec = get_method(name)
    if (name, family) in REFUSED:
        with pytest.raises(MoEError, match=REFUSED[name, family]):
            make(family, name)
        return
    plan = make(family, name)
    assert plan.method == name and plan.kind == spec.kind
    json.loads(plan.to_json())  # JSON data (tensors, if any, live beside it)
    loaded = saved_and_loaded(plan, tmp_path / "plan")
    assert loaded.to_json() == plan.to_json()  # complete

    ids = sample_ids(1, 12)
    model = tiny_model(family)
    reference = logits(model, ids)
    applied = apply(model, loaded)
    view = MoEView(model)
    if spec.is_identity:
        assert torch.equal(logits(model, ids), reference)
        return
    budget = resolve_budget(MoEView(tiny_model(family)), ratio=RATIO)
    if spec.kind in ("prune", "merge"):
        kept = plan.experts_kept()
        assert sum(kept.values()) == sum(budget.values())
        if not spec.global_budget:
            assert kept == budget
        assert view.experts_per_layer == kept  # physically removed
        out = logits(model, ids)
    else:  # select: per-input kept sets, at the budget of every layer's uniform count in total
        keep = applied.select(ids[0].tolist())
        assert sum(len(v) for v in keep.values()) == sum(budget.values())
        assert all(len(v) >= view.top_k for v in keep.values())
        out = applied.forward(ids).logits
    assert out.shape == reference.shape and torch.isfinite(out).all()
    if spec.kind == "prune":  # removing the experts computes what routing around them computes
        masked = tiny_model(family)
        apply(masked, plan, mode="mask")
        torch.testing.assert_close(logits(masked, ids), out, rtol=1e-5, atol=1e-5)

    if spec.kind == "merge":
        check_merged(tiny_model(family), model, plan)

    again = tiny_model(family)
    replay = apply(again, saved_and_loaded(plan, tmp_path / "again"))
    replayed = logits(again, ids) if spec.kind in ("prune", "merge") else replay.forward(ids).logits
    assert torch.equal(replayed, out)  # applying the saved plan gives the same model
