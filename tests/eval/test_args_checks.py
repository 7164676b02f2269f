"""pruned_moe's calibration sizes are checked when the model is built, naming the argument."""

from __future__ import annotations

import pytest

from moebench.eval.args import PrunedMoESettings

BASE = {"method": "frequency", "ratio": 0.5, "calib": "testbed:mix"}


@pytest.mark.parametrize("given, problem", [
    ({"calib_samples": "lots"}, "calib_samples='lots' must be a whole number"),
    ({"calib_samples": "2.5"}, "calib_samples='2.5' must be a whole number"),
    ({"calib_samples": 0}, "calib_samples=0 must be a whole number >= 1"),
    ({"calib_samples": 100_000_000},
     "calib_samples x calib_seq_len = 100,000,000 x 2,048 = 204,800,000,000 calibration tokens, more than"),
    ({"calib_samples": "16", "calib_seq_len": -1}, "calib_seq_len=-1 must be a whole number >= 1"),
    ({"seed": "abc"}, "seed='abc' must be a whole number"),
])
def test_bad_calibration_sizes_name_the_argument(given, problem):
    with pytest.raises(ValueError) as err:
        PrunedMoESettings.from_args({**BASE, **given}, {})
    assert problem in str(err.value)


def test_sizes_given_as_text_are_read_as_numbers():
    settings = PrunedMoESettings.from_args({**BASE, "calib_samples": "16", "calib_seq_len": "none", "seed": "3"}, {})
    assert (settings.calib_samples, settings.calib_seq_len, settings.seed) == (16, None, 3)
