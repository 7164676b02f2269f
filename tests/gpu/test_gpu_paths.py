"""The CUDA paths, on a GPU: `pytest -m gpu` (skipped, with the reason, where CUDA is absent).

Random models at real layer widths (a Qwen3-30B-A3B layer: 128 experts, hidden 2048, expert width
768; a Mixtral-8x7B layer: 8 experts, hidden 4096, width 14336) and the tiny testbed: the experts
kernel's device path (outputs, no host synchronisation, speed against transformers' default),
statistics and prune on the GPU equal to the CPU, NAEE on a GPU model, `--sequential` on cuda,
offloading with a real per-layer fetch and its memory drop, lm-eval `pruned_moe` with
``device=cuda``, and a ``device_map`` model. Figures are printed (``-s`` shows them). The set runs
in a few minutes on one GPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import sample_ids, tiny_model

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)


def real_layer(name: str, dtype=torch.bfloat16):
    from moebench.measure.kernel_bench import real_layer_experts

    return real_layer_experts(name, dtype, CUDA)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_kernel_device_path_is_sync_free_matches_the_default_and_is_timed(name):
    from moebench.measure.kernel_bench import time_kernels
    from moebench.moe import kernels

    experts, top_k = real_layer(name)
    for tokens in (1, 8, 512):
        hidden = torch.randn(tokens, experts.gate_up_proj.shape[-1], device=CUDA, dtype=torch.bfloat16)
        assert kernels.uses_grouped_path(hidden, None), "grouped_mm should run in bf16 on this GPU"
        weights, index = torch.randn(tokens, experts.num_experts, device=CUDA).softmax(-1).topk(top_k, -1)
        weights = weights.to(torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside raises
        try:
            out = kernels.moebench_experts_forward(experts, hidden, index, weights)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        result = time_kernels(experts, top_k, tokens, reps=15)
        scale = result["max_diff"]["grouped_mm"] + out.float().abs().max().item()
        assert result["max_diff"]["moebench"] <= 0.02 * scale, result["max_diff"]
        ratio = result["median_s"]["grouped_mm"] / result["median_s"]["moebench"]
        print(f"{name} {tokens} tokens: moebench kernel {1000 * result['median_s']['moebench']:.3f} ms, "
              f"grouped_mm {1000 * result['median_s']['grouped_mm']:.3f} ms -> {ratio:.2f}x")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_statistics_and_prune_on_the_gpu_equal_the_cpu(family):
    from moebench.calib.stats import CollectSettings, collect
    from moebench.moe.ops import prune
    from moebench.moe.view import MoEView

    cpu, gpu = tiny_model(family), tiny_model(family).to(CUDA)
    ids = sample_ids(4, 16)
    groups = ["routing", "norms", "outputs", "expert_means"]
    a = collect(cpu, ids, groups, CollectSettings(), progress=False)
    b = collect(gpu, ids.to(CUDA), groups, CollectSettings(), progress=False)
    for index in a:
        for name, value in a[index].items():
            assert b[index][name].device.type == "cpu"  # statistics come back to the host once per layer
            torch.testing.assert_close(b[index][name].to(value.dtype), value, rtol=1e-3, atol=1e-4)
    keep = {i: [0, 2, 3, 5, 6, 7] if MoEView(cpu).layer(i).groups is None else [0, 1, 2, 4, 5, 6]
            for i in MoEView(cpu).indices}
    prune(cpu, keep)
    prune(gpu, keep)
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.to(CUDA)).logits.cpu(), cpu(ids).logits, rtol=1e-3, atol=1e-4)


def test_naee_plans_a_gpu_model_as_on_the_cpu(tmp_path):
    from conftest import build_tokenizer

    from moebench.method.pipeline import PlanRequest, make_plan

    for device in ("cpu", "cuda"):
        model = tiny_model("mixtral").to(device)
        request = PlanRequest(model_id="tiny", method="naee", ratio=0.5, calib="testbed:mix", calib_samples=4,
                              calib_seq_len=32, stats_dir=str(tmp_path / device))
        plan = make_plan(model, build_tokenizer(), request, progress=False)
        if device == "cpu":
            expected = plan.keep
    assert plan.keep == expected


def test_prune_sequential_on_cuda_equals_the_cpu_prune(tmp_path):
    from moebench.cli import main

    os.environ["MOEBENCH_CACHE"] = str(tmp_path / "cache")
    common = ["--method", "naee", "--ratio", "0.5", "--calib", "testbed:mix", "--samples", "8", "--seq-len", "64"]
    for mode, device, out in (("--sequential", "cuda", "g"), ("--no-sequential", "cpu", "c")):
        assert main(["prune", "testbed-8e", *common, mode, "--device", device, "--out", str(tmp_path / out)]) == 0
    plans = [json.loads((tmp_path / d / "plan.json").read_text())["keep"] for d in ("g", "c")]
    assert plans[0] == plans[1]


def test_offloading_fetches_per_layer_and_frees_the_device(tmp_path):
    from moebench.moe.offload import ExpertOffloader
    from moebench.moe.view import MoEView

    model = tiny_model("qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                       num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                       mlp_only_layers=[], num_hidden_layers=2).to(CUDA, torch.bfloat16)
    view = MoEView(model)
    expert_bytes = view.expert_bytes()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(CUDA)
    offloader = ExpertOffloader(model)
    torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated(CUDA)
    assert before - after >= 0.95 * expert_bytes  # the experts left the device
    keeps = [{layer.index: list(range(0, 128, 4)) for layer in view.layers}]
    ids = sample_ids(1, 32).to(CUDA)
    torch.cuda.reset_peak_memory_stats(CUDA)
    with torch.no_grad(), offloader.batch(keeps):
        model(input_ids=ids)
    peak = torch.cuda.max_memory_allocated(CUDA)
    c = offloader.counters
    assert c["fetches"] > 0 and c["resident_bytes_peak"] <= expert_bytes // 2
    print(f"offload: expert bytes {expert_bytes / 2**30:.2f} GiB, device after offloading {after / 2**30:.2f} GiB "
          f"(-{(before - after) / 2**30:.2f}), forward peak {peak / 2**30:.2f} GiB, moved "
          f"{c['bytes_moved'] / 2**20:.0f} MiB, working set peak {c['resident_bytes_peak'] / 2**20:.0f} MiB")
    offloader.close()
    assert model.config._experts_implementation != "moebench"


def test_pruned_moe_in_lm_eval_on_cuda(tmp_path):
    import lm_eval

    from moebench.eval.model import PrunedMoELM
    from moebench.tasks import task_manager

    lm = PrunedMoELM(pretrained="testbed-8e", method="frequency", ratio=0.5, calib="testbed:mix", calib_samples=16,
                     calib_seq_len=64, device="cuda", batch_size=16, stats_dir=str(tmp_path / "stats"))
    results = lm_eval.simple_evaluate(model=lm, tasks=["testbed_logic_quick"], limit=32,
                                      task_manager=task_manager(["testbed_logic_quick"], ()))
    assert next(lm.model.parameters()).device.type == "cuda"
    assert results["results"]["testbed_logic_quick"]["acc,none"] > 0.25
    sizes = results["config"]["moebench"]["expert_bytes"]
    assert sizes["after"] < sizes["before"]


def test_offload_true_never_puts_the_whole_model_on_the_gpu(tmp_path):
    """offload=true: loaded in host memory, only the non-expert weights moved to the GPU; the GPU's peak stays
    below the model's size (it used to load the whole model on the GPU before offloading)."""
    import lm_eval

    from moebench.eval.model import PrunedMoELM
    from moebench.moe.checkpoint import load_model
    from moebench.moe.view import MoEView
    from moebench.tasks import task_manager

    host = load_model("testbed-8e")
    total = sum(p.numel() * p.element_size() for p in host.parameters())
    experts = MoEView(host).expert_bytes()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(CUDA)
    torch.cuda.reset_peak_memory_stats(CUDA)
    lm = PrunedMoELM(pretrained="testbed-8e", method="premoe_taer", ratio=0.5, calib="testbed:domains",
                     calib_samples=16, calib_seq_len=64, device="cuda", batch_size=8, offload=True,
                     stats_dir=str(tmp_path / "stats"))
    loaded_peak = torch.cuda.max_memory_allocated(CUDA) - base
    results = lm_eval.simple_evaluate(model=lm, tasks=["testbed_logic_quick"], limit=32,
                                      task_manager=task_manager(["testbed_logic_quick"], ()))
    peak = torch.cuda.max_memory_allocated(CUDA) - base
    c = results["config"]["moebench"]["offload"]
    print(f"offload at load: model {total / 2**20:.1f} MiB (experts {experts / 2**20:.1f}); GPU peak after loading "
          f"{loaded_peak / 2**20:.1f} MiB, during evaluation {peak / 2**20:.1f} MiB; working set peak "
          f"{c['resident_bytes_peak'] / 2**20:.1f} MiB")
    assert loaded_peak < total - 0.9 * experts  # the experts never reached the GPU while loading
    assert peak < total and 0 < c["resident_bytes_peak"] < experts
    assert next(lm.model.parameters()).device.type == "cuda"
    assert results["results"]["testbed_logic_quick"]["acc,none"] > 0.25


def test_a_device_map_model_is_viewed_and_pruned_in_place(tmp_path, saved_models):
    from moebench.moe.checkpoint import load_with_tokenizer
    from moebench.moe.ops import prune
    from moebench.moe.view import MoEView

    model, _ = load_with_tokenizer(saved_models("mixtral"), device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    prune(model, {i: [0, 1, 2, 3] for i in MoEView(model).indices})
    with torch.no_grad():
        assert torch.isfinite(model(sample_ids().to(CUDA)).logits).all()


@pytest.mark.parametrize("kind", ["lora", "router_kd"])
def test_recovery_trains_a_bf16_model_on_the_gpu_and_keeps_its_dtype(kind, tmp_path):
    import random

    from conftest import build_tokenizer
    from tiny_models import VOCAB

    from moebench.method.recover import RecoverSpec, recover, teacher_targets, windows
    from moebench.moe.ops import prune
    from moebench.moe.view import MoEView

    rng = random.Random(0)
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(5)) * 12 for _ in range(80)))
    model, tokenizer = tiny_model("qwen3_moe").to(CUDA, torch.bfloat16), build_tokenizer()
    spec = RecoverSpec.parse({"kind": kind, "data": f"file:{corpus}", "steps": 10, "batch": 2, "seq_len": 32,
                              "lr": 1e-2})
    targets = teacher_targets(model, windows(model, tokenizer, spec)) if kind == "router_kd" else None
    prune(model, {layer.index: [0, 1, 2, 3] for layer in MoEView(model).layers})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.cuda.reset_peak_memory_stats(CUDA)
    model, record = recover(model, tokenizer, spec, targets, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {CUDA}
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert record["cuda_peak_bytes"] > 0 and record["loss_last"] == record["loss_last"]
    print(f"recover {kind} on {torch.cuda.get_device_name(CUDA)}: {record['seconds']} s, "
          f"peak {record['cuda_peak_bytes'] / 2**20:.1f} MiB")
