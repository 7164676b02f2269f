"""The recovery stage (`moebench.method.recover`): what each kind trains, in which precision, and what is refused."""

from __future__ import annotations

import random
import re

import pytest
import torch
from conftest import build_tokenizer
from tiny_models import VOCAB, tiny_model

from moebench.eval.args import PrunedMoESettings
from moebench.method.recover import RecoverSpec, recover, teacher_targets, windows
from moebench.moe.ops import prune
from moebench.moe.view import MoEView


@pytest.fixture
def corpus(tmp_path):
    """Learnable text: each document repeats one short random phrase, so a few steps lower the loss."""
    rng = random.Random(0)
    phrases = [" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(5)) for _ in range(4)]
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(" ".join([phrases[i % 4]] * 12) for i in range(80)))
    return f"file:{path}"


def spec(kind: str, data: str, **extra) -> RecoverSpec:
    return RecoverSpec.parse({"kind": kind, "data": data, "steps": 12, "batch": 2, "seq_len": 32, "lr": 1e-2,
                              **extra})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(model, before: dict) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_lora_reaches_the_fused_expert_tensors_and_merges_into_a_plain_model(family, corpus):
    model = tiny_model(family)
    prune(model, {layer.index: [0, 1, 2] for layer in MoEView(model).layers})
    before, kind = snapshot(model), type(model)
    model, record = recover(model, build_tokenizer(), spec("lora", corpus), progress=False)
    assert type(model) is kind and not any("lora" in name for name, _ in model.named_parameters())
    moved = changed(model, before)
    for layer in MoEView(model).layers:
        expert_names = {f"model.layers.{layer.index}.mlp.experts.{name}" for name in layer.expert_tensors()
                        if name.endswith("proj")}
        assert expert_names and expert_names <= moved  # the fused [E, ...] tensors carry the merged adapters
        assert not {f"model.layers.{layer.index}.mlp.{layer.family.router}.weight"} & moved  # routers untouched
    assert any("self_attn.q_proj" in name for name in moved)
    assert record["expert_rank"] == max(1, round(8 * MoEView(model).top_k / 3))
    assert record["trained_parameters"] > 0 and record["loss_last_tenth"] < record["loss_first_tenth"]


def distillation_loss(model, tokens: torch.Tensor, targets: dict) -> float:
    """KL(teacher || model) over the teacher's top tokens, on every window at once."""
    with torch.no_grad():
        student = torch.log_softmax(model(input_ids=tokens).logits.float().gather(-1, targets["ids"].long()), -1)
    return float((targets["logp"].exp() * (targets["logp"] - student)).sum(-1).mean())


def test_router_kd_trains_only_the_routers_towards_the_unpruned_model(corpus):
    model, tokenizer = tiny_model("mixtral"), build_tokenizer()
    settings = spec("router_kd", corpus, lr=1e-2)
    tokens = windows(model, tokenizer, settings)
    targets = teacher_targets(model, tokens)
    prune(model, {layer.index: [0, 2, 5, 7] for layer in MoEView(model).layers})
    before, gap = snapshot(model), distillation_loss(model, tokens, targets)
    model, record = recover(model, tokenizer, settings, targets, progress=False)
    assert changed(model, before) == {f"model.layers.{layer.index}.mlp.gate.weight" for layer in MoEView(model).layers}
    assert distillation_loss(model, tokens, targets) < 0.95 * gap  # closer to the unpruned model's predictions
    assert record["trained_parameters"] == sum(layer.router.weight.numel() for layer in MoEView(model).layers)


def test_lora_after_merging_trains_the_merged_experts(corpus):
    from moebench.moe.merge import merge

    model = tiny_model("mixtral")
    groups = [{"into": 0, "experts": [0, 1, 2, 3], "weights": [0.25] * 4},
              {"into": 4, "experts": [4, 5, 6, 7], "weights": [0.25] * 4}]
    merge(model, {layer.index: groups for layer in MoEView(model).layers})
    before = snapshot(model)
    model, record = recover(model, build_tokenizer(), spec("lora", corpus), progress=False)
    assert MoEView(model).experts_per_layer == {layer.index: 2 for layer in MoEView(model).layers}
    assert "model.layers.0.mlp.experts.down_proj" in changed(model, before)
    assert record["expert_rank"] == max(1, round(8 * 2 / 2))  # top-2 of the 2 merged experts


def test_router_kd_without_the_teachers_targets_is_refused(corpus):
    with pytest.raises(ValueError, match="needs the unpruned model's targets"):
        recover(tiny_model("mixtral"), build_tokenizer(), spec("router_kd", corpus), None, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_through_float32_masters_and_keep_their_dtype(dtype, corpus):
    model = tiny_model("mixtral").to(dtype)
    before = snapshot(model)
    model, record = recover(model, build_tokenizer(), spec("full", corpus), progress=False)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert len(changed(model, before)) > 10 and torch.isfinite(torch.tensor(record["loss_last"]))


@pytest.mark.parametrize("value, problem", [
    ({"kind": "qlora", "data": "testbed:mix"}, "kind='qlora' must be one of lora, router_kd, full"),
    ({"kind": "lora"}, "give the training data as a calibration source"),
    ({"kind": "lora", "data": "testbed:mx"}, "unknown calibration source 'testbed:mx'"),
    ({"kind": "lora", "data": "testbed:mix", "steps": 0}, "steps=0 must be a whole number >= 1"),
    ({"kind": "lora", "data": "testbed:mix", "steps": "ten"}, "steps='ten' must be a whole number"),
    ({"kind": "lora", "data": "testbed:mix", "lr": 2}, "lr=2.0 must be in (0, 1)"),
    ({"kind": "lora", "data": "testbed:mix", "rnak": 4}, "unknown key 'rnak' (did you mean 'rank'?)"),
    ("lora", "give a mapping such as"),
])
def test_bad_recovery_settings_are_named(value, problem):
    with pytest.raises(ValueError) as err:
        RecoverSpec.parse(value)
    assert problem in str(err.value)


@pytest.mark.parametrize("args, problem", [
    ({"method": "premoe_taer", "ratio": "0.5", "calib": "testbed:domains"}, "keeps every expert and chooses some"),
    ({"method": "naee", "ratio": "0.5", "calib": "testbed:mix", "skip": "naee"}, "dynamic skipping's thresholds"),
    ({"method": "reap", "ratio": "0.5", "calib": "testbed:mix", "apply": "mask"}, "apply=mask keeps every expert"),
    ({"method": "none"}, "recover=... trains a pruned model"),
])
def test_pruned_moe_refuses_recovery_where_there_is_no_pruned_model_to_train(args, problem):
    own = {**args, "recover": "lora", "recover_data": "testbed:mix"}
    params = {}
    with pytest.raises(ValueError, match=re.escape(problem)):
        PrunedMoESettings.from_args(own, params)


def test_recover_settings_without_a_kind_are_refused():
    with pytest.raises(ValueError, match=re.escape("recover_steps=... sets up a recovery stage: give recover=lora")):
        PrunedMoESettings.from_args({"method": "random", "ratio": "0.5", "recover_steps": "10"}, {})
