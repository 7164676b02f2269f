"""What a first run costs and where it stops: calibrate's default groups, and inputs that cannot be read (a hub
id offline, a hub calibration source offline) refused before any model is loaded, leaving no cache folder."""

from __future__ import annotations

import inspect
import os
import random

import huggingface_hub
import pytest
from tiny_models import VOCAB

import moebench.cli.common as common
from moebench.calib.sources import availability_problem
from moebench.cli import main


@pytest.fixture
def offline(monkeypatch):
    """The Hub in offline mode, as HF_HUB_OFFLINE=1 sets it (read by huggingface_hub at import)."""
    monkeypatch.setattr(inspect.getmodule(huggingface_hub.is_offline_mode), "HF_HUB_OFFLINE", True)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(common, "load_with_tokenizer", refuse)
    monkeypatch.setattr(common, "LayeredCheckpoint", refuse)


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(40)) for _ in range(20)))
    return str(path)


def calibrate(model: str, calib: str, stats: str, *extra: str) -> int:
    return main(["calibrate", model, "--calib", calib, "--samples", "4", "--seq-len", "16", "--stats-dir", stats,
                 *extra])


def cached_groups(stats: str) -> set[str]:
    return {name[:-3] for _, _, files in os.walk(stats) for name in files if name.endswith(".pt")
            and not name.startswith("layer-")}


def test_calibrate_collects_the_cheap_groups_by_default_and_says_which_methods_they_serve(
        saved_models, corpus, tmp_path, capsys):
    stats = str(tmp_path / "stats")
    assert calibrate(saved_models("mixtral"), f"file:{corpus}", stats) == 0
    out = capsys.readouterr().out
    assert "calibrate: collecting routing, norms, logits: what ean, evoesap, frequency, man, msan, premoe, " \
           "premoe_taer, reap, soft_activation, unified need" in out
    assert "naee: outputs" in out and "hc_smoe: expert_means" in out and "add --methods NAME, or --groups all" in out
    assert cached_groups(stats) == {"routing", "norms", "logits"}  # no dense expert pass on a first run

    assert calibrate(saved_models("mixtral"), f"file:{corpus}", stats, "--methods", "hc_smoe") == 0
    assert "collecting routing, expert_means: what frequency, hc_smoe, soft_activation, sub_moe need" in \
        capsys.readouterr().out
    assert cached_groups(stats) == {"routing", "norms", "logits", "expert_means"}


@pytest.mark.parametrize("args, problem", [
    (["--groups", "routng"], "unknown statistic group 'routng' (did you mean 'routing'?)"),
    (["--methods", "reapp"], "unknown method 'reapp' (did you mean 'reap'?)"),
    (["--methods", "random"], "--methods random: these methods need no calibration statistics"),
])
def test_calibrate_refuses_unknown_groups_and_methods_before_loading(tmp_path, capsys, no_loading, args, problem):
    assert calibrate("testbed-8e", "testbed:mix", str(tmp_path / "stats"), *args) == 2
    assert problem in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "stats")


@pytest.mark.parametrize("command", ["calibrate", "prune"])
def test_a_hub_id_offline_is_refused_at_once(tmp_path, capsys, offline, no_loading, command):
    extra = ["--method", "reap", "--ratio", "0.5", "--out", str(tmp_path / "out")] if command == "prune" else []
    assert main([command, "someorg/some-moe", "--calib", "testbed:mix", "--stats-dir", str(tmp_path / "stats"),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert "someorg/some-moe is not a local folder, so it is read as a hub id; HF_HUB_OFFLINE is set" in err
    assert "Retrying" not in err and not os.path.exists(tmp_path / "stats")


def test_a_hub_calibration_source_offline_is_refused_before_the_model_loads(saved_models, tmp_path, capsys,
                                                                             offline, no_loading):
    stats = tmp_path / "stats"
    assert calibrate(saved_models("mixtral"), "c4", str(stats)) == 2
    err = capsys.readouterr().err
    assert "calibration source 'c4': could not load dataset 'allenai/c4'" in err and "HF_HUB_OFFLINE is set" in err
    assert "MOEBENCH_DATA_DIR" in err and not os.path.exists(stats)


def test_cached_statistics_of_a_source_let_it_pass_offline(tmp_path, offline, corpus):
    stats = tmp_path / "stats"
    assert "could not load dataset 'allenai/c4'" in availability_problem("c4", str(stats), 4, 0)
    (stats / "some-model-0123" / "c4-4x16-s0" / "v2-abc").mkdir(parents=True)
    assert availability_problem("c4", str(stats), 4, 0) is None  # the run may need no data: left to the cache
    assert availability_problem("c4", str(stats), 8, 0) is not None  # other windows: not what is cached
    assert availability_problem(f"testbed:mix+file:{corpus}", str(tmp_path / "none"), 4, 0) is None  # local


def test_a_source_that_fails_in_the_pass_leaves_no_empty_cache_folder(saved_models, tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "w1 w2"}\nnot json\n')
    stats = tmp_path / "stats"
    assert calibrate(saved_models("mixtral"), f"file:{bad}", str(stats)) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
    assert not os.path.exists(stats)


def test_pruned_moe_refuses_an_unreadable_source_before_loading(saved_models, tmp_path, offline, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from moebench.eval.model import PrunedMoELM

    monkeypatch.setattr(HFLM, "_create_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(OSError, match="pruned_moe: calibration source 'c4': could not load dataset 'allenai/c4'"):
        PrunedMoELM(pretrained=saved_models("mixtral"), method="reap", ratio=0.5, calib="c4",
                    stats_dir=str(tmp_path / "stats"), device="cpu")
