"""MoNE (zxgx/mode-pd): parity with a float64 transcription of the authors' code, novices in the kernel,
plans and checkpoints with their constants, bf16.

The reference below is written from ``modepd/pruning/expert_prune.py`` (``expert_prune_by_mone`` with
``--mone_ranking_metric fusion --expert_ranking_scope layer``, the published runs' settings) and the
novice MLP of ``modepd/model/olmoe/modeling_olmoe.py``, in our own words and float64: one sequence per
forward batch (their DataLoader's batch_size=1), a gate hook that keeps a running mean of the summed
gates, per-expert hooks that keep a running mean of the expert's output and a running "fluctuation",
the fusion metric (w phi_var)((1 - w) phi_freq) with w = 0.5, the strict threshold at the
(n_keep + 1)-th score, and novices that return their mean times the gate. moebench's numbers come from
one real statistics pass in batches of 8 sequences.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from parity_reference import Reference, block_inputs, calibration_tokens, differentiated_model
from tiny_models import sample_ids

from moebench.calib.stats import CollectSettings, collect
from moebench.method.apply import apply
from moebench.method.pipeline import plan_from_stats
from moebench.method.plan import Plan
from moebench.method.registry import get_method, resolve_budget
from moebench.moe.kernels import NOVICE_ATTR
from moebench.moe.novice import NOVICE_FILE, NoviceCheckpointWarning
from moebench.moe.view import MoEError, MoEView

FAMILIES = ("olmoe", "deepseek_v3", "qwen3_moe", "mixtral")  # OLMoE: the authors'; DeepSeek-V3: Moonlight's router
LENGTH = 12  # tokens per calibration sequence (parity_reference.calibration_tokens)
REL = 1e-6
_SETUP: dict[str, tuple] = {}


class MoneReference(Reference):
    """`Reference` with OLMoE's router (modeling_olmoe.py OlmoeTopKRouter: softmax top-k, renormalised only
    with norm_topk_prob, which OLMoE leaves off)."""

    def route(self, x, allowed=None):
        if self.family != "olmoe":
            return super().route(x, allowed)
        w, i = torch.softmax(self.logits(x), dim=-1).topk(self.k, dim=-1)
        if self.config.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return i, w


def authors_mone(ref: MoneReference, x: torch.Tensor, n_keep: int) -> dict:
    """expert_prune_by_mone on one layer's inputs ``x [S*L, H]``, one sequence per step, in float64."""
    n, hidden = ref.n, x.shape[1]
    gate_score, gate_seen = torch.zeros(n, dtype=torch.float64), 0
    mean, fluc = torch.zeros(n, hidden, dtype=torch.float64), torch.zeros(n, hidden, dtype=torch.float64)
    seen = [0] * n
    for start in range(0, len(x), LENGTH):
        xs = x[start:start + LENGTH]
        idx, w = ref.route(xs)
        # gate hook: running mean of the per-step sum of the routing weights; the step counts the gate's input
        # rows (OLMoE's gate sees [T, H]; DeepSeek's MoEGate sees [B, L, H], B = 1: a per-layer constant apart)
        rows = len(xs) if ref.family == "olmoe" else 1
        dense = torch.zeros(len(xs), n, dtype=torch.float64).scatter(1, idx, w.double())
        gate_score = gate_score * gate_seen / (gate_seen + rows) + dense.sum(0) / (gate_seen + rows)
        gate_seen += rows
        for e in range(n):  # expert hooks (their DeepSeek loop skips experts without tokens)
            token = (idx == e).any(-1).nonzero().flatten()
            t = len(token)
            if t == 0:
                continue
            out = ref.expert(e, xs[token])
            mean[e] = mean[e] * seen[e] / (seen[e] + t) + out.sum(0) / (seen[e] + t)
            if seen[e] > 0:
                fluc[e] = fluc[e] * (seen[e] - 1) / (seen[e] + t - 1) + ((out - mean[e]) ** 2).sum(0) / (seen[e] + t)
            seen[e] += t
    metric = (0.5 * fluc.sqrt().norm(dim=1)) * (0.5 * gate_score)
    threshold = metric.sort(descending=True).values[n_keep]
    kept = (metric > threshold).nonzero().flatten().tolist()
    return {"metric": metric, "kept": kept, "mean": mean, "gate_score": gate_score, "fluc": fluc,
            "replaced": [e for e in range(n) if e not in kept]}


def novice_output(ref: MoneReference, x: torch.Tensor, replaced: list[int], mean: torch.Tensor) -> torch.Tensor:
    """The routed output with novices: kept experts as before, a replaced one returns its mean times the gate
    (modeling_olmoe.py OlmoeMLP with is_approx; OlmoeSparseMoeBlock multiplies by the routing weight)."""
    idx, w = ref.route(x)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in idx.unique().tolist():
        token, slot = torch.where(idx == e)
        y = mean[e].expand(len(token), -1) if e in replaced else ref.expert(e, x[token])
        out.index_add_(0, token, w[token, slot].double().unsqueeze(-1) * y)
    return out


def setup(family: str):
    """(model, view, block inputs, references, statistics), once per family."""
    if family not in _SETUP:
        model = differentiated_model(family)
        view, tokens = MoEView(model), calibration_tokens()
        inputs = block_inputs(model, view, tokens)
        refs = {layer.index: MoneReference(family, layer.block, view.config) for layer in view.layers}
        stats = collect(model, tokens, ["routing", "routed_moments"], CollectSettings(batch_size=8), progress=False)
        _SETUP[family] = (model, view, inputs, refs, stats)
    return _SETUP[family]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().flatten(), expected.detach().double().flatten()
    return float(((actual - expected).abs() / expected.abs().clamp_min(1e-300)).nan_to_num(0.0).max())


def mone_plan(family: str, keep: int = 4, **params) -> Plan:
    _, view, _, _, stats = setup(family)
    return plan_from_stats(view, "mone", params, resolve_budget(view, keep=keep), stats)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_kept_experts_and_novices_equal_the_authors_code(family):
    """Scores (up to the per-model constant), kept sets and novice vectors equal the transcription; OLMoE's
    scores equal theirs exactly once their constant 0.25 = w (1 - w) is put back."""
    from moebench.methods.mone import mone_scores

    _, view, inputs, refs, stats = setup(family)
    for n_keep in (6, 4):
        plan = mone_plan(family, n_keep)
        for layer in view.layers:
            authors = authors_mone(refs[layer.index], inputs[layer.index], n_keep)
            ours = mone_scores(stats[layer.index])
            assert relative(ours / ours.max(), authors["metric"] / authors["metric"].max()) < REL, family
            if family == "olmoe":
                assert relative(0.25 * ours, authors["metric"]) < REL
            order = authors["metric"].sort(descending=True).values
            assert order[n_keep - 1] > order[n_keep]  # no tie at the threshold: both keep exactly n_keep
            assert plan.keep[layer.index] == authors["kept"]
            novice = plan.novice[layer.index]
            assert novice["experts"] == authors["replaced"]
            assert novice["vectors"].dtype == torch.float32
            expected = authors["mean"][authors["replaced"]]  # the model runs in float32: near-zero units differ
            assert (novice["vectors"].double() - expected).abs().max() < 1e-6 * expected.abs().max()


def test_variance_options_measure_the_authors_estimator_against_the_papers():
    """variance=unbiased (the paper's formula) is the exact unbiased variance; the default, their per-sequence
    update, leaves each expert's first sequence out and differs from it measurably on 16 short sequences."""
    from moebench.methods.mone import mone_scores

    _, view, inputs, refs, stats = setup("olmoe")
    for layer in view.layers:
        ref, x, s = refs[layer.index], inputs[layer.index], stats[layer.index]
        idx, w = ref.route(x)
        expected = torch.zeros(ref.n, dtype=torch.float64)
        for e in range(ref.n):
            token = (idx == e).any(-1).nonzero().flatten()
            if len(token) > 1:
                expected[e] = ref.expert(e, x[token]).var(dim=0, unbiased=True).sum().sqrt()
        gate = torch.zeros(len(x), ref.n, dtype=torch.float64).scatter(1, idx, w.double()).mean(0)
        assert relative(mone_scores(s, variance="unbiased"), gate * expected) < REL
        assert relative(mone_scores(s), mone_scores(s, variance="unbiased")) > 1e-3
        counts = torch.zeros(ref.n, dtype=torch.float64).scatter_add(0, idx.flatten(), torch.ones(idx.numel(),
                                                                     dtype=torch.float64))
        assert torch.equal(s["routed_count"], counts)
        assert relative(mone_scores(s, variance="unbiased", frequency="count"), counts / len(x) * expected) < REL


def test_routed_moments_do_not_depend_on_the_batch_size():
    """The statistics are running sums and a per-sequence update: batches of 1, 3 or 16 sequences agree (to the
    float32 forward's own batch-shape rounding)."""
    model, _, _, _, stats = setup("olmoe")
    for batch in (1, 3, 16):
        other = collect(model, calibration_tokens(), ["routed_moments"], CollectSettings(batch_size=batch),
                        progress=False)
        for index, s in other.items():
            for name, t in s.items():
                torch.testing.assert_close(t, stats[index][name], rtol=1e-5, atol=1e-6 * float(t.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_output_with_novices_equals_the_authors_model(family):
    """The experts module with novices in place (physical) computes the routed output of the authors' model
    whose replaced experts return gate x mean, on the grouped path (few tokens) and the loop."""
    _, _, inputs, refs, _ = setup(family)
    plan = mone_plan(family)
    pruned = differentiated_model(family)
    before = MoEView(pruned).expert_bytes()
    apply(pruned, plan)
    pruned_view = MoEView(pruned)
    assert pruned_view.expert_bytes() == before // 2  # 4 of 8 experts left in memory
    for layer in pruned_view.layers:
        assert layer.num_experts == 4 and layer.router.weight.shape[0] == 8  # the router is unchanged
        novices = getattr(layer.experts, NOVICE_ATTR)
        ref, x = refs[layer.index], inputs[layer.index]
        expected = novice_output(ref, x, novices.replaced, novices.vectors.double()[
            [novices.replaced.index(e) if e in novices.replaced else 0 for e in range(ref.n)]])
        for rows in (slice(0, 10), slice(0, len(x))):
            routing = layer.route(x[rows])
            with torch.no_grad():
                out = layer.experts(x[rows], routing.indices, routing.weights)
            scale = float(expected[rows].abs().max())  # float32 model against the float64 reference
            torch.testing.assert_close(out.double(), expected[rows], rtol=1e-5, atol=1e-6 * scale)


def test_mask_mode_computes_what_physical_mode_computes_and_plans_round_trip(tmp_path):
    plan = mone_plan("olmoe")
    plan.save(str(tmp_path / "plan.json"))
    assert (tmp_path / NOVICE_FILE).is_file() and "vectors" in (tmp_path / "plan.json").read_text()
    assert (tmp_path / "plan.json").stat().st_size < 4096  # the vectors are not in the JSON
    loaded = Plan.load(str(tmp_path / "plan.json"))
    assert loaded.to_json() == plan.to_json()
    for index, entry in plan.novice.items():
        assert torch.equal(loaded.novice[index]["vectors"], entry["vectors"])
    ids = sample_ids(2, 20)
    physical, masked = differentiated_model("olmoe"), differentiated_model("olmoe")
    apply(physical, loaded)
    apply(masked, plan, mode="mask")
    assert MoEView(masked).expert_bytes() == MoEView(differentiated_model("olmoe")).expert_bytes()
    with torch.no_grad():
        torch.testing.assert_close(masked(input_ids=ids).logits, physical(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    text = (tmp_path / "plan.json").read_text()
    (tmp_path / "tampered.json").write_text(text.replace('"novices.safetensors"', '"../x"', 1))
    with pytest.raises(ValueError, match="must name a file beside it"):
        Plan.load(str(tmp_path / "tampered.json"))
    data = json.loads(text)
    data["novice"][next(iter(data["novice"]))]["experts"] = [1, 1]
    (tmp_path / "tampered.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="distinct expert ids"):
        Plan.load(str(tmp_path / "tampered.json"))
    (tmp_path / NOVICE_FILE).unlink()
    with pytest.raises(ValueError, match="novice vectors file is missing"):
        Plan.load(str(tmp_path / "plan.json"))
    with pytest.raises(MoEError, match="not a tensor"):  # the JSON alone holds no vectors
        apply(differentiated_model("olmoe"), Plan(**json.loads(plan.to_json())))


def test_checkpoint_round_trip_gives_equal_logits_and_plain_transformers_refuses(tmp_path):
    from transformers import AutoModelForCausalLM

    from moebench.moe.checkpoint import load_model, save_pruned

    plan = mone_plan("deepseek_v3")
    model = differentiated_model("deepseek_v3")
    apply(model, plan)
    with pytest.warns(NoviceCheckpointWarning, match="plain transformers cannot load"):
        save_pruned(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["moebench_novices"]["layers"] == {str(i): e["experts"] for i, e in plan.novice.items()}
    assert config["n_routed_experts"] == 8 and (tmp_path / NOVICE_FILE).is_file()
    loaded = load_model(str(tmp_path))
    assert MoEView(loaded).experts_per_layer == plan.experts_kept()
    ids = sample_ids(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="mismatch"):
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_prune_cli_writes_a_checkpoint_with_its_constants(saved_models, corpus, tmp_path):
    """`moebench prune --method mone`: the checkpoint and plan.json with novices.safetensors beside them; the
    loader's logits are those of plan.json applied to the base model."""
    from moebench.cli import main
    from moebench.moe.checkpoint import load_model

    out = tmp_path / "mone"
    with pytest.warns(NoviceCheckpointWarning):
        assert main(["prune", saved_models("qwen3_moe"), "--method", "mone", "--ratio", "0.5", "--calib",
                     f"file:{corpus}", "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"),
                     "--out", str(out)]) == 0
    plan = Plan.load(str(out / "plan.json"))
    base = load_model(saved_models("qwen3_moe"))
    apply(base, plan)
    model = load_model(str(out))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_bf16_keeps_float32_vectors_and_adds_them_in_the_model_dtype():
    """In bf16 the layer with novices computes the float32 layer's output to bf16 precision, and the model's
    logits move from float32's no more than the unpruned model's do in bf16."""
    plan = mone_plan("qwen3_moe")
    reference = differentiated_model("qwen3_moe")
    apply(reference, plan)
    model = differentiated_model("qwen3_moe").to(torch.bfloat16)
    apply(model, plan)
    layer, ref_layer = MoEView(model).layers[0], MoEView(reference).layers[0]
    assert getattr(layer.experts, NOVICE_ATTR).vectors.dtype == torch.float32
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    routing = ref_layer.route(x)
    with torch.no_grad():
        out = layer.experts(x.bfloat16(), routing.indices, routing.weights.bfloat16())
        expected = ref_layer.experts(x, routing.indices, routing.weights)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 2e-2 * expected.abs().max()
    ids = sample_ids(2, 20)
    plain32, plain16 = differentiated_model("qwen3_moe"), differentiated_model("qwen3_moe").to(torch.bfloat16)
    with torch.no_grad():
        drift = (model(input_ids=ids).logits.float() - reference(input_ids=ids).logits).abs().max()
        plain_drift = (plain16(input_ids=ids).logits.float() - plain32(input_ids=ids).logits).abs().max()
    assert torch.isfinite(drift) and drift < 2 * plain_drift


def test_novices_combine_with_skipping_and_zero_novices_drop_the_constants():
    from moebench.moe.skipping import enable_skipping

    ids = sample_ids(2, 20)
    skipped = differentiated_model("mixtral")
    apply(skipped, mone_plan("mixtral"))
    enable_skipping(skipped, dict.fromkeys(MoEView(skipped).indices, 0.5))
    zero = differentiated_model("mixtral")
    apply(zero, mone_plan("mixtral", novice="zero"))
    mean = differentiated_model("mixtral")
    apply(mean, mone_plan("mixtral"))
    with torch.no_grad():
        assert torch.isfinite(skipped(input_ids=ids).logits).all()
        assert not torch.allclose(zero(input_ids=ids).logits, mean(input_ids=ids).logits)


def test_measured_skipping_thresholds_on_novices_read_back_from_the_cache(corpus, tmp_path):
    """skip=naee measures beta on the model with its novices: the routing statistics of that model are in the
    router's ids (E wide, novice pairs included), so the cache reads them back without complaint."""
    from conftest import build_tokenizer
    from tiny_models import tiny_model

    from moebench.method.pipeline import PlanRequest, prepare

    request = PlanRequest(method="mone", ratio=0.5, calib=f"file:{corpus}", calib_samples=4, calib_seq_len=16,
                          stats_dir=str(tmp_path / "stats"), model_id="tiny", skip="naee")
    first = prepare(tiny_model("mixtral"), build_tokenizer(), request, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a StatsCacheWarning would say the cached statistics were refused
        again = prepare(tiny_model("mixtral"), build_tokenizer(), request, progress=False)
    assert again.plan.skip == first.plan.skip and set(first.plan.skip["betas"]) == set(first.plan.keep)


def test_refusals_name_the_reason():
    from tiny_models import tiny_model

    model = tiny_model("llama4_text")
    view = MoEView(model)
    stats = collect(model, sample_ids(2, 8), ["routing", "routed_moments"], progress=False)
    with pytest.raises(MoEError, match="no output gate to scale a constant"):
        plan_from_stats(view, "mone", {}, resolve_budget(view, ratio=0.5), stats)
    with pytest.raises(ValueError, match=r"written from the model in memory.*--no-sequential"):
        get_method("mone").check_sequential({})
    from moebench.moe.ops import mask, prune

    novices = differentiated_model("mixtral")
    apply(novices, mone_plan("mixtral"))
    for verb in (prune, mask):  # the router's ids are not the experts module's: selections by id would misfire
        with pytest.raises(MoEError, match="have novice experts"):
            verb(novices, {0: [0, 1]})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_novices_on_cuda_match_the_cpu_without_host_synchronisation(dtype):
    """On a GPU the kernel's device path with novices (grouped for every token count there) adds the
    constants without a host synchronisation and computes what the float32 CPU model computes."""
    cuda = torch.device("cuda", 0)
    plan = mone_plan("qwen3_moe")
    cpu = differentiated_model("qwen3_moe")
    apply(cpu, plan)
    gpu = differentiated_model("qwen3_moe").to(cuda, dtype)
    apply(gpu, plan)
    layer, cpu_layer = MoEView(gpu).layers[0], MoEView(cpu).layers[0]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    routing = cpu_layer.route(x)
    args = (x.to(cuda, dtype), routing.indices.to(cuda), routing.weights.to(cuda, dtype))
    with torch.no_grad():
        layer.experts(*args)  # warm up: the vectors are copied to the device once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = layer.experts(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expected = cpu_layer.experts(x, routing.indices, routing.weights)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and (out.float().cpu() - expected).abs().max() < tolerance * expected.abs().max()
    ids = sample_ids(2, 20)
    with torch.no_grad():
        logits = gpu(input_ids=ids.to(cuda)).logits.float().cpu()
        assert torch.isfinite(logits).all()
        if dtype == torch.float32:
            torch.testing.assert_close(logits, cpu(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
