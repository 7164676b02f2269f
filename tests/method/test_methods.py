"""Every method on every family at ratios 0.25 and 0.5 gives a valid plan; method-specific checks."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moebench.calib.stats import GROUPS, CollectSettings, collect
from moebench.method.pipeline import plan_from_stats
from moebench.method.registry import get_method, load_methods, resolve_budget
from moebench.moe.view import MoEError, MoEView

_STATS = {}


def family_stats(family):
    """Model, view and all statistic groups of a tiny model (collected once per family)."""
    if family not in _STATS:
        model = tiny_model(family)
        stats = collect(model, sample_ids(4, 16), GROUPS, CollectSettings(subsample_tokens=64), progress=False)
        _STATS[family] = (model, MoEView(model), stats)
    return _STATS[family]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_every_method_gives_valid_plans(family, ratio):
    _model, view, stats = family_stats(family)
    budget = resolve_budget(view, ratio=ratio)
    for name in sorted(load_methods()):
        spec = get_method(name)
        if spec.kind not in ("prune", "merge") or spec.is_identity:
            continue
        if name == "mone" and view.family.gate_scales_input:  # refused: no output gate to scale a constant
            with pytest.raises(MoEError, match="no output gate"):
                plan_from_stats(view, name, {}, budget, stats, ratio=ratio)
            continue
        tokens = {"calibration_tokens": sample_ids(4, 16)}  # the search set of methods that run the model (evoesap)
        plan = plan_from_stats(view, name, {}, budget, stats, ratio=ratio, extra=tokens)
        kept = plan.experts_kept()
        assert sum(kept.values()) == sum(budget.values()), name
        if not spec.global_budget:
            assert kept == budget, name
        assert all(n >= view.top_k for n in kept.values()), name
        assert set(plan.keep) == set(view.indices), name
        for ids in plan.keep.values():
            assert ids == sorted(set(ids)) and all(0 <= i < 8 for i in ids), name


def test_scores_pick_the_best_experts():
    _model, view, stats = family_stats("mixtral")
    budget = resolve_budget(view, keep=4)
    plan = plan_from_stats(view, "frequency", {}, budget, stats)
    for index, ids in plan.keep.items():
        counts = stats[index]["counts"]
        assert counts[ids].min() >= counts[[i for i in range(8) if i not in ids]].max()


def test_random_is_seeded():
    _, view, stats = family_stats("mixtral")
    budget = resolve_budget(view, ratio=0.5)
    a = plan_from_stats(view, "random", {"seed": 1}, budget, stats).keep
    assert a == plan_from_stats(view, "random", {"seed": 1}, budget, stats).keep
    assert any(a != plan_from_stats(view, "random", {"seed": s}, budget, stats).keep for s in range(2, 6))


def test_unknown_method_and_parameter_suggest():
    with pytest.raises(ValueError, match="did you mean 'frequency'"):
        get_method("frequncy")
    with pytest.raises(ValueError, match="has no parameter 'sed' \\(did you mean 'seed'\\?\\)"):
        get_method("random").parse_params({"sed": 1})
    with pytest.raises(ValueError, match="seed='x' is not a int"):
        get_method("random").parse_params({"seed": "x"})


def test_impossible_budget_names_the_numbers():
    _, view, _ = family_stats("mixtral")
    with pytest.raises(MoEError,
                       match=r"ratio=0.9 leaves 1 experts but the router selects top_k=2; use ratio <= 0.750"):
        resolve_budget(view, ratio=0.9)
    with pytest.raises(ValueError, match=r"ratio=1.2 must be in \[0, 1\)"):
        resolve_budget(view, ratio=1.2)


def test_group_budget_keeps_equal_numbers_per_group():
    _, view, stats = family_stats("deepseek_v3")
    budget = resolve_budget(view, ratio=0.25)
    assert set(budget.values()) == {6}
    plan = plan_from_stats(view, "reap", {}, budget, stats)
    for ids in plan.keep.values():
        assert sum(i < 4 for i in ids) == sum(i >= 4 for i in ids) == 3


def test_every_method_file_registers_something():
    import pkgutil

    import moebench.methods as pkg

    modules = {spec.module for spec in load_methods().values()}
    for info in pkgutil.iter_modules(pkg.__path__):
        assert f"moebench.methods.{info.name}" in modules, f"methods/{info.name}.py registers no method"


def test_every_method_cites_its_paper_and_formula():
    for spec in load_methods().values():
        assert spec.paper and len(spec.doc) > 40 and spec.source, spec.name




def test_grape_takes_more_from_the_more_redundant_layer():
    """A layer whose experts all behave alike (redundant) loses more experts than a diverse one."""
    from moebench.methods.grape import cka_similarity

    _model, view, stats = family_stats("mixtral")
    stats = {i: dict(s) for i, s in stats.items()}
    first, second = view.indices
    base = stats[first]["all_outputs"][:, :1]
    noise = 0.01 * torch.randn(stats[first]["all_outputs"].shape, generator=torch.Generator().manual_seed(0))
    stats[first]["all_outputs"] = base + noise  # every expert of the first layer ~ the same output
    assert cka_similarity(stats[first]["all_outputs"]).mean() > cka_similarity(stats[second]["all_outputs"]).mean()
    budget = resolve_budget(view, ratio=0.25)
    plan = plan_from_stats(view, "grape", {"gamma": 0.5}, budget, stats)
    kept = plan.experts_kept()
    assert sum(kept.values()) == 12 and kept[first] < kept[second]


def test_grape_keeps_the_survivors_of_its_pair_rule():
    """One rule decides the budget and the experts: the lower-scored expert of the most similar pair goes,
    even when it is not among the lowest-scored (a top-by-score pick would have kept it)."""
    _model, view, stats = family_stats("mixtral")
    stats = {i: dict(s) for i, s in stats.items()}
    first, second = view.indices
    g = torch.Generator().manual_seed(1)
    out = stats[first]["all_outputs"]
    shared = out[:, :1] + 0.05 * torch.randn(out.shape, generator=g)  # a redundant layer: experts alike
    shared[:, 1] = shared[:, 0] + 1e-4 * torch.randn(shared[:, 0].shape, generator=g)  # 0 and 1 the most alike
    stats[first]["all_outputs"] = shared
    stats[second]["all_outputs"] = torch.randn(stats[second]["all_outputs"].shape, generator=g)  # diverse
    stats[first]["counts"] = torch.tensor([100.0, 90, 10, 20, 30, 40, 50, 60], dtype=torch.float64)
    plan = plan_from_stats(view, "grape", {"score": "frequency", "gamma": 1.0}, resolve_budget(view, keep=7), stats)
    assert len(plan.keep[first]) == 6 and len(plan.keep[second]) == 8
    assert 1 not in plan.keep[first] and 0 in plan.keep[first]
