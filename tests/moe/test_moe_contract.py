"""One contract over every supported MoE family: view, prune, mask, save/reload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, observe_input, sample_ids, tiny_model

from moebench.moe.ops import is_masked, mask, prune, unmask
from moebench.moe.view import MoEError, MoEView

KEEP6 = [0, 1, 3, 5, 6, 7]  # 3 of 4 in each of the 2 routing groups
KEEP4 = [0, 3, 4, 7]  # 2 of 4 in each group


def logits(model, ids=None):
    with torch.no_grad():
        return model(sample_ids() if ids is None else ids).logits


def test_view_finds_moe_layers_and_skips_dense(family):
    model = tiny_model(family)
    view = MoEView(model)
    n_layers = model.config.num_hidden_layers
    dense_first = family in {"deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "qwen3_moe"}
    assert view.indices == list(range(1 if dense_first else 0, n_layers))
    assert all(n == 8 for n in view.experts_per_layer.values())
    assert view.top_k == (1 if family == "llama4_text" else 2)
    layer = view.layers[0]
    for name, tensor in layer.expert_tensors().items():
        assert tensor.shape[0] == 8, name
    assert layer.router_tensors()["weight"][0].shape == (8, 32)
    assert 0 < view.expert_bytes() < view.total_bytes()


def test_route_returns_the_gate_values_the_block_uses(family):
    """route() on a block's input gives the weights and ids its experts are called with."""
    model = tiny_model(family)
    layer = MoEView(model).layers[0]
    seen = {}
    hooks = [observe_input(layer.block, lambda a: seen.setdefault("hidden", a.detach())),
             layer.experts.register_forward_pre_hook(lambda m, a: seen.setdefault("experts_args", a) and None)]
    logits(model)
    for hook in hooks:
        hook.remove()
    routing = layer.route(seen["hidden"])
    t = seen["hidden"].reshape(-1, 32).shape[0]
    assert routing.logits.shape == (t, 8)
    assert routing.weights.shape == routing.indices.shape == (t, layer.top_k)
    if layer.family.experts_slot:  # experts(hidden, indices, weights)
        _, indices, weights = seen["experts_args"]
        order, ref_order = routing.indices.argsort(-1), indices.argsort(-1)
        assert torch.equal(routing.indices.gather(-1, order), indices.gather(-1, ref_order))
        assert torch.allclose(routing.weights.gather(-1, order), weights.gather(-1, ref_order))
    else:  # Llama4 scales each token's copy by its dense gate score before the experts run
        dense = torch.zeros(t, 8).scatter(1, routing.indices, routing.weights)
        routed_in = seen["experts_args"][0].reshape(8, t, 32)
        assert torch.allclose(routed_in, seen["hidden"].reshape(1, t, 32) * dense.T.unsqueeze(-1), atol=1e-6)


def test_keep_all_is_bit_identical(family):
    model = tiny_model(family)
    before = logits(model)
    prune(model, {i: range(8) for i in MoEView(model).indices})
    assert torch.equal(logits(model), before)


def test_prune_equals_mask_and_unmask_restores(family):
    ref = tiny_model(family)
    original = logits(ref)
    indices = MoEView(ref).indices
    keep = {i: (KEEP6 if j % 2 == 0 else KEEP4) for j, i in enumerate(indices)}
    mask(ref, keep)
    assert is_masked(ref)
    masked = logits(ref)
    pruned_model = tiny_model(family)
    prune(pruned_model, keep)
    pruned = logits(pruned_model)
    assert (masked - pruned).abs().max().item() <= 1e-5
    assert not torch.allclose(masked, original)  # the mask really changed routing
    unmask(ref)
    assert not is_masked(ref)
    assert torch.equal(logits(ref), original)
    view = MoEView(pruned_model)
    assert view.experts_per_layer == {i: len(k) for i, k in keep.items()}
    for layer in view.layers:
        assert all(t.shape[0] == layer.num_experts for t in layer.expert_tensors().values())
        assert all(t.shape[d] == layer.num_experts for t, d in layer.router_tensors().values())


def test_prune_updates_config_under_family_key(family):
    model = tiny_model(family)
    view = MoEView(model)
    prune(model, dict.fromkeys(view.indices, KEEP6))
    saved = model.config.to_dict()
    assert saved[view.family.count_key] == 6
    assert "moebench_experts_per_layer" not in saved


def test_uniform_prune_reloads_with_plain_transformers(tmp_path):
    """save_pretrained -> AutoModelForCausalLM.from_pretrained in a fresh process without moebench."""
    expected = {}
    for family in FAMILIES:
        model = tiny_model(family)
        prune(model, dict.fromkeys(MoEView(model).indices, KEEP6))
        model.save_pretrained(tmp_path / family)
        expected[family] = logits(model).tolist()
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})  # the tests root: tiny_models
from tiny_models import sample_ids
expected = json.load(open({str(tmp_path / 'expected.json')!r}))
worst = {{}}
for family, ref in expected.items():
    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + family).eval()
    with torch.no_grad():
        out = m(sample_ids()).logits
    worst[family] = (out - torch.tensor(ref)).abs().max().item()
assert 'moebench' not in sys.modules
print(json.dumps(worst))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(worst) == set(FAMILIES)
    assert all(diff == 0.0 for diff in worst.values()), worst


@pytest.mark.parametrize("keep, message", [
    ({"L": [0]}, "keeps 1 experts but the router selects top_k=2; keep at least 2"),
    ({"L": [0, 1, 9]}, "expert ids [9] out of range 0..7"),
    ({"L": [0, 1, 1]}, "expert ids [1] listed more than once"),
    ({0: [0, 1, 2]}, "not an MoE layer"),
])
def test_invalid_selection_names_the_numbers(keep, message):
    model = tiny_model("deepseek_v3")
    first = MoEView(model).indices[0]
    keep = {(first if k == "L" else k): v for k, v in keep.items()}
    with pytest.raises(MoEError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prune(model, keep)


def test_group_limited_routing_rules():
    model = tiny_model("deepseek_v3")
    first = MoEView(model).indices[0]
    with pytest.raises(MoEError, match=r"equal drops per group; kept per group \[4, 2\]: keep 3 in each group"):
        mask(model, {first: [0, 1, 2, 3, 4, 5]})
    two_groups = tiny_model("deepseek_v3", topk_group=2)
    with pytest.raises(MoEError, match=r"keep at least 2 experts per group \(kept 1\)"):
        mask(two_groups, {first: [0, 4]})
    strict = tiny_model("deepseek_v2", num_experts_per_tok=3)
    first = MoEView(strict).indices[0]
    with pytest.raises(MoEError, match=r"topk_group=1 x 2 kept per group = 2 < top_k=3"):
        prune(strict, {first: KEEP4})


def test_every_problem_is_listed_at_once():
    model = tiny_model("mixtral")
    with pytest.raises(MoEError) as err:
        prune(model, {0: [0], 1: [0, 8]})
    assert "layer 0" in str(err.value) and "layer 1" in str(err.value)


def test_model_without_moe_layers_is_an_error():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(MoEError, match="has no MoE layers"):
        _ = MoEView(model).layers  # the layers are resolved on access


def test_unsupported_family_is_an_error():
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(MoEError, match="'llama' is not a supported MoE family"):
        MoEView(model)


def test_transformers4_style_experts_are_an_error():
    model = tiny_model("mixtral")
    block = model.model.layers[0].mlp
    block.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(8)])
    with pytest.raises(MoEError, match=r"transformers 4\.x style"):
        _ = MoEView(model).layers  # the layers are resolved on access


@pytest.mark.parametrize("decode_max_tokens", [0, 10_000])
def test_moebench_kernel_equals_eager_on_both_paths(family, decode_max_tokens, monkeypatch):
    """The loop path (prefill) and the grouped path (decode) of the moebench kernel give the eager
    kernel's logits, hand an observer the same per-expert outputs, and skip the same pairs."""
    from moebench.moe import kernels
    from moebench.moe.skipping import disable_skipping, enable_skipping

    model = tiny_model(family)
    view = MoEView(model)
    experts = [layer.experts for layer in view.layers]
    if not view.family.experts_slot:
        pytest.skip(f"{family}: experts run outside transformers' experts slot (no kernel to compare)")
    ids = sample_ids(2, 4)  # 8 tokens per call: the grouped path below its threshold
    model.set_experts_implementation("eager")
    reference = logits(model, ids)

    class Record:
        def __init__(self):
            self.seen = []

        def routed(self, module, hidden, index, weights, outputs):
            self.seen.append({e: tuple(t.clone() for t in v) for e, v in outputs.items()})

    monkeypatch.setattr(kernels, "DECODE_MAX_TOKENS", decode_max_tokens)
    grouped = decode_max_tokens > 0
    assert kernels.uses_grouped_path(torch.zeros(8, 4), None) == grouped
    records = [Record() for _ in experts]
    with kernels.use_moebench_kernel(model), kernels.observing(experts, records):
        assert torch.allclose(logits(model, ids), reference, atol=1e-5)
    for module, record in zip(experts, records, strict=True):
        assert len(record.seen) == 1 and record.seen[0]
        for e, (token, gate, y) in record.seen[0].items():
            assert token.tolist() == sorted(token.tolist())  # tokens ascending, as the loop reports them
            assert torch.allclose(y, kernels.expert_forward(module, e, _block_inputs(model, ids, module)[token]),
                                  atol=1e-5)
            assert gate.shape == token.shape
    betas = {layer.index: 0.5 for layer in view.layers}
    enable_skipping(model, betas)
    with kernels.use_moebench_kernel(model):
        skipped = logits(model, ids)
    disable_skipping(model)
    monkeypatch.setattr(kernels, "DECODE_MAX_TOKENS", 10_000 - decode_max_tokens)  # the other path
    enable_skipping(model, betas)
    with kernels.use_moebench_kernel(model):
        assert torch.allclose(logits(model, ids), skipped, atol=1e-5)
    disable_skipping(model)


def _block_inputs(model, ids, experts_module) -> torch.Tensor:
    """The input ``[T, H]`` that ``experts_module`` receives in a forward of ``ids``."""
    seen = {}

    def keep(module, args):
        seen.setdefault("x", args[0].detach())  # returns None: the input is not replaced

    hook = experts_module.register_forward_pre_hook(keep)
    try:
        logits(model, ids)
    finally:
        hook.remove()
    return seen["x"]
