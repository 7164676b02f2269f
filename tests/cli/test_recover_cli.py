"""`moebench recover`: a pruned checkpoint trained (LoRA merged, or routers distilled) and written as a new checkpoint
that plain transformers loads, with the recovery recorded in plan.json, config.json and the card."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from moebench.cli import main


@pytest.fixture
def pruned(saved_models, tmp_path):
    rng = random.Random(0)
    phrases = [" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(5)) for _ in range(4)]
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n\n".join(" ".join([phrases[i % 4]] * 12) for i in range(80)))
    out = tmp_path / "pruned"
    assert main(["prune", saved_models("mixtral"), "--method", "frequency", "--ratio", "0.5", "--calib",
                 f"file:{corpus}", "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"),
                 "--out", str(out)]) == 0
    return out, f"file:{corpus}"


def logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers
    with torch.no_grad():
        return model(input_ids=torch.arange(4, 20).unsqueeze(0)).logits


def weights(folder) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())


def test_lora_recovery_writes_a_plain_checkpoint_of_the_pruned_size_that_says_what_it_did(pruned, tmp_path, capsys):
    folder, data = pruned
    out = tmp_path / "recovered"
    assert main(["recover", str(folder), "--kind", "lora", "--data", data, "--steps", "10", "--batch", "2",
                 "--seq-len", "32", "--lr", "1e-2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "recover lora on file:" in said and "10 steps: loss" in said and f"saved to {out}" in said
    before, after = weights(folder), weights(out)
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(before[experts], after[experts])
    assert torch.equal(before["model.layers.0.mlp.gate.weight"], after["model.layers.0.mlp.gate.weight"])
    assert not torch.allclose(logits(folder), logits(out))
    config = json.loads((out / "config.json").read_text())
    assert config["moebench"]["recover"]["kind"] == "lora" and config["moebench"]["method"] == "frequency"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["extra"]["recover"]["steps"] == 10
    assert plan["keep"] == json.loads((folder / "plan.json").read_text())["keep"]
    card = (out / "README.md").read_text()
    assert "Recovered after pruning: LoRA adapters" in card and "moebench-recover-lora" in card

    # a recovered checkpoint is not recovered again; an occupied --out is refused
    assert main(["recover", str(out), "--kind", "lora", "--data", data, "--out", str(tmp_path / "again")]) == 2
    assert "was recovered already" in capsys.readouterr().err
    assert main(["recover", str(folder), "--kind", "lora", "--data", data, "--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_router_kd_recovery_changes_only_the_routers(pruned, saved_models, tmp_path, capsys):
    folder, data = pruned
    out = tmp_path / "distilled"
    assert main(["recover", str(folder), "--kind", "router_kd", "--data", data, "--teacher", saved_models("mixtral"),
                 "--steps", "10", "--batch", "2", "--seq-len", "32", "--stats-dir", str(tmp_path / "stats"),
                 "--out", str(out)]) == 0
    assert "the unpruned model's targets computed and cached in" in capsys.readouterr().err
    before, after = weights(folder), weights(out)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith("mlp.gate.weight") for k in moved)


def test_not_a_pruned_checkpoint_is_refused(saved_models, tmp_path, capsys):
    assert main(["recover", saved_models("mixtral"), "--kind", "lora", "--data", "testbed:mix", "--out",
                 str(tmp_path / "x")]) == 2
    assert "is not a checkpoint written by moebench prune" in capsys.readouterr().err
