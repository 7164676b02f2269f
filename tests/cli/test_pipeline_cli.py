"""Statistics cache behaviour, make_plan end to end, and `moebench prune` on every family."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tokenizer
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import moebench.calib.cache as stats_cache
from moebench.cli import main
from moebench.method.pipeline import PlanRequest, make_plan
from moebench.moe.view import MoEView


@pytest.fixture
def passes(monkeypatch):
    """Records the statistic groups of every real collection pass."""
    calls = []
    real = stats_cache.collect

    def counting(model, tokens, groups, *args, **kwargs):
        calls.append(sorted(groups))
        return real(model, tokens, groups, *args, **kwargs)

    monkeypatch.setattr(stats_cache, "collect", counting)
    return calls


def request(corpus, tmp_path, **kw):
    base = {"calib": f"file:{corpus}", "calib_samples": 4, "calib_seq_len": 16, "stats_dir": str(tmp_path / "stats"),
            "model_id": "tiny"}
    return PlanRequest(**{**base, **kw})


def test_two_methods_three_ratios_cost_one_pass(corpus, tmp_path, passes):
    model, tok = tiny_model("mixtral"), build_tokenizer()
    plans = [make_plan(model, tok, request(corpus, tmp_path, method=m, ratio=r), progress=False)
             for m in ("reap", "frequency") for r in (0.25, 0.5, 0.75)]
    assert len(passes) == 1
    assert [sum(p.experts_kept().values()) for p in plans] == [12, 8, 4] * 2
    assert plans[0].calib.startswith("file-calib")


def test_cache_hit_runs_no_forward_and_missing_group_is_added(corpus, tmp_path, passes):
    model, tok = tiny_model("qwen3_moe"), build_tokenizer()
    make_plan(model, tok, request(corpus, tmp_path, method="frequency", ratio=0.5), progress=False)
    forwards = []
    hook = model.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True)
    make_plan(model, tok, request(corpus, tmp_path, method="soft_activation", ratio=0.5), progress=False)
    assert forwards == [] and len(passes) == 1
    make_plan(model, tok, request(corpus, tmp_path, method="naee", ratio=0.5), progress=False)
    hook.remove()
    assert passes == [["logits", "norms", "routing"], ["outputs"]]


def test_changed_model_does_not_read_another_models_statistics(corpus, tmp_path, passes):
    tok = build_tokenizer()
    make_plan(tiny_model("mixtral", seed=0), tok, request(corpus, tmp_path, method="reap", ratio=0.5), progress=False)
    make_plan(tiny_model("mixtral", seed=1), tok, request(corpus, tmp_path, method="reap", ratio=0.5), progress=False)
    assert len(passes) == 2


def test_statistics_settings_are_part_of_the_cache_key(corpus, tmp_path, passes):
    """subsample_tokens / ratio_samples change the statistics, so they key the cache; 0 keeps every token."""
    from moebench.calib.cache import cache_dir
    from moebench.method.pipeline import statistics

    model, tok = tiny_model("mixtral"), build_tokenizer()
    every = request(corpus, tmp_path, method="naee", subsample_tokens=0, ratio_samples=0)
    stats = statistics(model, tok, every, ["outputs", "routing"], progress=False)
    first = next(iter(stats.values()))
    assert first["all_outputs"].shape[0] == 4 * 16 and first["ratio_samples"].shape == (64,)
    statistics(model, tok, every, ["outputs"], progress=False)  # the same settings: a cache hit
    assert len(passes) == 1
    few = request(corpus, tmp_path, method="naee", subsample_tokens=10, ratio_samples=20)
    stats = statistics(model, tok, few, ["outputs", "routing"], progress=False)
    first = next(iter(stats.values()))
    assert len(passes) == 2 and first["all_outputs"].shape[0] == 10 and first["ratio_samples"].shape == (20,)
    default = request(corpus, tmp_path, method="naee")
    folders = {cache_dir("s", "m", "c", r.collect_settings()) for r in (every, few, default)}
    assert len(folders) == 3


def test_calibrate_cli_takes_the_statistics_settings(saved_models, corpus, tmp_path, capsys):
    from moebench.calib.stats import CollectSettings

    args = ["calibrate", saved_models("mixtral"), "--calib", f"file:{corpus}", "--samples", "4", "--seq-len", "16",
            "--stats-dir", str(tmp_path / "stats"), "--groups", "outputs", "--subsample-tokens", "0"]
    assert main(args) == 0
    saved = list((tmp_path / "stats").rglob("outputs.pt"))
    every = stats_cache._settings_hash(CollectSettings(subsample_tokens=0))
    assert len(saved) == 1 and saved[0].parent.name.endswith(every)
    index = torch.load(saved[0], weights_only=True)
    first = sorted(index["layers"])[0]
    # outputs are kept one file per MoE layer, named by the index file
    layer = torch.load(saved[0].parent / "outputs" / f"layer-{first}.pt", weights_only=True)["layers"][first]
    assert layer["all_outputs"].shape[0] == 64
    with pytest.raises(SystemExit):
        main([*args[:-1], "-5"])
    assert "-5 must be >= 0" in capsys.readouterr().err


def test_method_needing_statistics_without_calibration_is_an_error():
    with pytest.raises(ValueError, match=r"needs calibration statistics .* give a calibration source"):
        make_plan(tiny_model("mixtral"), build_tokenizer(), PlanRequest(method="reap", ratio=0.5), progress=False)


def test_prune_cli_writes_a_plain_checkpoint_and_plan(family, saved_models, corpus, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", saved_models(family), "--method", "reap", "--ratio", "0.25", "--calib", f"file:{corpus}",
                 "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"), "--out", str(out)])
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "reap" and plan["ratio"] == 0.25 and plan["calib"].startswith("file-calib")
    model = AutoModelForCausalLM.from_pretrained(out)
    view = MoEView(model)
    assert {str(i): n for i, n in view.experts_per_layer.items()} == {k: len(v) for k, v in plan["keep"].items()}
    assert set(view.experts_per_layer.values()) == {6}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()
    assert "expert bytes" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_prune_cli_merges_into_a_plain_checkpoint(family, saved_models, corpus, tmp_path):
    """`moebench prune --method hc_smoe --param router=dominant`: plain transformers loads the merged checkpoint
    (one router row per group), and its logits are those of plan.json applied to the base model."""
    from moebench.method.apply import apply
    from moebench.method.plan import Plan

    out = tmp_path / "merged"
    assert main(["prune", saved_models(family), "--method", "hc_smoe", "--ratio", "0.5", "--calib", f"file:{corpus}",
                 "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"), "--out", str(out),
                 "--param", "router=dominant"]) == 0
    plan = Plan.load(str(out / "plan.json"))
    assert plan.kind == "merge" and any(len(g["experts"]) > 1 for groups in plan.merge.values() for g in groups)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(saved_models(family)).eval()
    apply(base, plan)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert set(MoEView(model).experts_per_layer.values()) == {4}


@pytest.mark.parametrize("layout", ["compact", "duplicated"])
def test_prune_cli_writes_the_authors_merge_in_either_layout(layout, saved_models, corpus, tmp_path):
    """hc_smoe's default (router=all): `--layout compact` loads with moebench (G experts, every router row),
    `--layout duplicated` with plain transformers (E experts); both compute plan.json applied to the base model."""
    from moebench.method.apply import apply
    from moebench.method.plan import Plan
    from moebench.moe.checkpoint import load_model

    out = tmp_path / layout
    assert main(["prune", saved_models("mixtral"), "--method", "hc_smoe", "--ratio", "0.5", "--calib",
                 f"file:{corpus}", "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"),
                 "--out", str(out), "--layout", layout]) == 0
    plan = Plan.load(str(out / "plan.json"))
    assert plan.expert_map is not None
    model = load_model(str(out)) if layout == "compact" else AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(saved_models("mixtral")).eval()
    apply(base, plan)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)
    assert set(MoEView(model).experts_per_layer.values()) == ({4} if layout == "compact" else {8})
    assert ("moebench_expert_map" in (out / "config.json").read_text()) == (layout == "compact")
    assert ("plain transformers and vLLM cannot" in (out / "README.md").read_text()) == (layout == "compact")


def test_prune_cli_bad_input_is_a_clear_error(saved_models, corpus, tmp_path, capsys):
    args = ["prune", saved_models("mixtral"), "--calib", f"file:{corpus}", "--out", str(tmp_path / "o")]
    assert main([*args, "--method", "reapp", "--ratio", "0.5"]) == 2
    assert "did you mean 'reap'" in capsys.readouterr().err
    assert main([*args, "--method", "reap", "--ratio", "0.9"]) == 2
    assert "leaves 1 experts but the router selects top_k=2" in capsys.readouterr().err


def test_errors_are_spelled_in_the_syntax_of_the_front_end_that_raised_them(saved_models, tmp_path, capsys):
    assert main(["prune", saved_models("mixtral"), "--method", "reap", "--ratio", "0.5", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--calib c4" in err and "calib=" not in err
    cli = PlanRequest(method="reap", ratio=0.5, front_end="cli")
    with pytest.raises(ValueError, match="--calib c4 or --calib testbed:mix") as caught:
        make_plan(tiny_model("mixtral"), build_tokenizer(), cli, progress=False)
    assert "calib=" not in str(caught.value)
    assert cli.spell(calib_samples=16, calib_seq_len=64) == "--samples 16 --seq-len 64"
    lm_eval_style = PlanRequest(method="reap", ratio=0.5)  # the lm-eval model's requests: model_args
    with pytest.raises(ValueError, match="calib=c4 or calib=testbed:mix"):
        make_plan(tiny_model("mixtral"), build_tokenizer(), lm_eval_style, progress=False)


def test_methods_listing_names_reconstructions_and_our_choices(capsys):
    assert main(["methods"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "v3 PEU: our reconstruction" in rows["premoe"] and "reconstruction (no code)" in rows["grape"]
    assert "our reconstruction" in rows["prep"] and "gate=reference: the authors' code" in rows["reap"]
