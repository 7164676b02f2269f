"""The unified routed-token formula: frequency, EAN and REAP are its instances (equal to their own scores), and
MAN / MSAN are the routed-token means of the activation norm and its square."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from moebench.calib.stats import collect
from moebench.method.registry import get_method, load_methods
from moebench.methods.unified import INSTANCES, unified_score
from moebench.moe.view import MoEView


class _Ctx:
    def __init__(self, stats):
        self.stats = stats


@pytest.fixture(scope="module")
def stats_and_view():
    model = tiny_model("mixtral", seed=3)
    ids = torch.randint(4, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    stats = collect(model, ids, ("routing", "norms"), progress=False)
    return stats, MoEView(model)


def test_registered_methods_are_instances_of_the_formula(stats_and_view):
    stats, view = stats_and_view
    load_methods()
    for name, switches in INSTANCES.items():
        fn = get_method(name).fn
        for layer in view.layers:
            own = fn(_Ctx(stats), layer, **get_method(name).parse_params({}))
            formula = unified_score(stats[layer.index], *switches)
            torch.testing.assert_close(own.float(), formula.float(), rtol=1e-6, atol=1e-6, msg=name)
            param = get_method("unified").parse_params(dict(zip(("frequency", "gate", "power"), switches, strict=True)))
            assert torch.equal(get_method("unified").fn(_Ctx(stats), layer, **param), formula)


def test_man_and_msan_are_means_over_routed_tokens(stats_and_view):
    stats, view = stats_and_view
    for layer in view.layers:
        s = stats[layer.index]
        count = s["norm_count"].double()
        routed = count > 0
        assert routed.any()
        man = get_method("man").fn(_Ctx(stats), layer).double()
        msan = get_method("msan").fn(_Ctx(stats), layer).double()
        torch.testing.assert_close(man[routed], (s["norm_sum"].double() / count)[routed])
        torch.testing.assert_close(msan[routed], (s["norm_sq_sum"].double() / count)[routed])
        assert (man[~routed] == 0).all() and (msan[~routed] == 0).all()
        assert (msan[routed] >= man[routed] ** 2 - 1e-6).all()  # E[x^2] >= E[x]^2


def test_bad_switches_are_refused():
    load_methods()
    with pytest.raises(ValueError, match="outside"):
        get_method("unified").parse_params({"power": 3})
    with pytest.raises(ValueError, match="gate=1, power=2: the statistics hold"):
        unified_score({"norm_count": torch.ones(2)}, 0, 1, 2)
    assert set(get_method("unified").needs_for({"power": 0})) == {"norms", "routing"}
    assert set(get_method("unified").needs_for({})) == {"norms"}
