"""Paired speed: the order sides are timed in, what is active while each is timed, and the ratio's
definition (the same for grid cells and `moebench bench`). No timing is asserted."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from transformers import AutoModelForCausalLM

from moebench.measure.paired import Side, interleaved, median_interval, paired_speed, ratio_summary
from moebench.method.apply import unchanged
from moebench.moe.kernels import KERNEL_NAME, experts_kernel, register


class Recorder:
    def __init__(self):
        self.active, self.calls = None, []

    def side(self, name: str) -> Side:
        @contextmanager
        def setup():
            self.active = name
            yield
            self.active = None

        return Side(name, runner=None, setup=setup)


def test_sides_alternate_with_the_order_reversed_every_other_repetition(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(Side, "device", property(lambda self: __import__("torch").device("cpu")))
    sides = [rec.side("reference"), rec.side("variant"), rec.side("extra")]

    def work(side):
        assert rec.active == side.name  # each side runs with its own setup switched on, and only then
        rec.calls.append(side.name)

    times = interleaved(sides, work, reps=3, warmup=1, best_of=1)
    assert rec.calls == ["reference", "variant", "extra",  # warm-up
                         "reference", "variant", "extra", "extra", "variant", "reference",
                         "reference", "variant", "extra"]
    assert {k: len(v) for k, v in times.items()} == {"reference": 3, "variant": 3, "extra": 3}
    assert rec.active is None
    rec.calls = []
    times = interleaved(sides[:2], work, reps=2, warmup=0, best_of=2)  # each repetition keeps a side's faster run
    assert rec.calls == ["reference", "reference", "variant", "variant", "variant", "variant", "reference", "reference"]
    assert {k: len(v) for k, v in times.items()} == {"reference": 2, "variant": 2}


def test_the_ratio_is_the_median_of_per_repetition_ratios_with_its_interval():
    got = ratio_summary([2.0, 2.0, 3.0, 2.0, 2.0], [1.0, 2.0, 1.0, 4.0, 1.6])
    assert got["ratios"] == [2.0, 1.0, 3.0, 0.5, 1.25] and got["speedup"] == 1.25 and got["pairs"] == 5
    assert (got["speedup_lo"], got["speedup_hi"]) == (0.5, 3.0)  # 5 pairs: their range (93.8% coverage)
    assert median_interval(list(range(1, 10))) == (2, 8)  # 9 pairs: 2nd smallest to 2nd largest (96.1%)
    assert median_interval(list(range(1, 13))) == (3, 10)
    with pytest.raises(ValueError, match="as many reference as variant"):
        ratio_summary([1.0], [1.0, 2.0])


def test_paired_speed_times_both_kernels_of_one_model_and_restores_its_kernel(saved_models):
    register()
    model = AutoModelForCausalLM.from_pretrained(saved_models("mixtral")).eval()
    default = model.config._experts_implementation
    runner = unchanged(model)
    seen = []
    real_forward = runner.forward

    def forward(ids, use_cache=False):
        seen.append(model.config._experts_implementation)
        return real_forward(ids, use_cache)

    runner.forward = forward
    got = paired_speed([Side("default", runner), Side("moebench", runner, lambda: experts_kernel(model, KERNEL_NAME))],
                       batch=1, prompt_len=8, new_tokens=3, reps=3, warmup=1)
    assert model.config._experts_implementation == default
    assert seen[:2] == [default, KERNEL_NAME]  # warm-up of each side, each in its own kernel
    assert set(got["ratios"]) == {"moebench"} and got["ratios"]["moebench"]["decode"]["pairs"] == 3
    assert len(got["times"]["default"]["prefill"]) == 3 and got["default"]["decode"]["tokens_per_s"] > 0


def test_long_lived_objects_are_frozen_only_inside_the_timing_block():
    """`long_lived_frozen`: garbage made before it is collected on entry, objects alive then are left out of the
    collector's scans inside, garbage made inside is still collected, and afterwards nothing stays frozen."""
    import gc
    import weakref

    from moebench.measure.paired import long_lived_frozen

    class Cycle:
        pass

    before = Cycle()
    before.me = before
    gone_before = weakref.ref(before)
    del before
    with long_lived_frozen():
        assert gone_before() is None and gc.get_freeze_count() > 0
        inside = Cycle()
        inside.me = inside
        gone_inside = weakref.ref(inside)
        del inside
        gc.collect()
        assert gone_inside() is None
    assert gc.get_freeze_count() == 0
