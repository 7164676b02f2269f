"""Input-aware selection (PreMoE TAER, PREP): per-sample masks, context-only selection, lm-eval, retrieval."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from tiny_lm_eval import loglikelihoods, write_tasks
from tiny_models import sample_ids, tiny_model

METHODS = ("premoe_taer", "prep")


def evaluate(env, model: str, model_args, tasks=("tiny_mc",), limit=8, batch_size=4) -> dict:
    """`lm_eval.simple_evaluate` on the local tasks, samples logged, no bootstrap."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=limit,
                                   task_manager=TaskManager(include_path=env.tasks, include_defaults=False),
                                   device="cpu", batch_size=batch_size, bootstrap_iters=0, log_samples=True)


@pytest.fixture(scope="module")
def senv(tmp_path_factory, saved_models):
    """Tiny Mixtral, local tasks, and three calibration 'tasks' (files over disjoint word ranges)."""
    root = tmp_path_factory.mktemp("select")
    write_tasks(root / "tasks")
    sources = []
    for n, (lo, hi) in enumerate(((0, 30), (30, 60), (60, 92))):
        rng = random.Random(n)
        path = root / f"task{n}.txt"
        path.write_text("\n\n".join(" ".join(f"w{rng.randrange(lo, hi)}" for _ in range(40)) for _ in range(12)))
        sources.append(f"file:{path}")
    calib = f"calib={'+'.join(sources)},calib_samples=4,calib_seq_len=32,stats_dir={root / 'stats'}"
    return SimpleNamespace(root=root, tasks=str(root / "tasks"), model=saved_models("mixtral"), calib=calib)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_sample_mask_rows_equal_single_masks(model_type):
    from moebench.moe.ops import mask, sample_mask, unmask
    from moebench.moe.view import MoEView

    model = tiny_model(model_type)
    view = MoEView(model)
    keeps = [{i: [0, 1, 2, 3] for i in view.indices}, {i: [2, 3, 5, 7] for i in view.indices},
             {i: list(range(8)) for i in view.indices}]
    ids = sample_ids(batch=3, length=10)
    with torch.no_grad(), sample_mask(model, keeps):
        batched = model(input_ids=ids).logits
    for row, keep in enumerate(keeps):
        mask(model, keep)
        with torch.no_grad():
            alone = model(input_ids=ids[row:row + 1]).logits[0]
        unmask(model)
        torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits[0], batched[0])  # the masks did act


@pytest.mark.parametrize("method", METHODS)
def test_ratio_zero_equals_unpruned(senv, method):
    base = evaluate(senv, "hf", f"pretrained={senv.model}", tasks=("tiny_mc", "tiny_gen"))
    sel = evaluate(senv, "pruned_moe", f"pretrained={senv.model},method={method},ratio=0,{senv.calib}",
                   tasks=("tiny_mc", "tiny_gen"))
    assert loglikelihoods(sel) == loglikelihoods(base)
    assert [s["resps"] for s in sel["samples"]["tiny_gen"]] == [s["resps"] for s in base["samples"]["tiny_gen"]]
    record = sel["config"]["moebench"]
    assert record["kind"] == "select" and record["selection"]["requests"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_1_and_8_give_identical_scores(senv, method):
    args = f"pretrained={senv.model},method={method},ratio=0.5,{senv.calib}"
    one = evaluate(senv, "pruned_moe", args, tasks=("tiny_mc", "tiny_ppl"), batch_size=1)
    eight = evaluate(senv, "pruned_moe", args, tasks=("tiny_mc", "tiny_ppl"), batch_size=8)
    full = evaluate(senv, "hf", f"pretrained={senv.model}", tasks=("tiny_mc",))
    assert one["config"]["moebench"]["keep_frequency"] == eight["config"]["moebench"]["keep_frequency"]
    torch.testing.assert_close(torch.tensor(loglikelihoods(one)), torch.tensor(loglikelihoods(eight)),
                               rtol=1e-5, atol=1e-5)
    assert loglikelihoods(one) != loglikelihoods(full)  # selection really changed the model
    freq = one["config"]["moebench"]["keep_frequency"]
    assert all(len(f) == 8 and abs(sum(f) - 4) < 1e-3 for f in freq.values()) or method == "prep"


def test_batch_size_auto_probes_without_selection_and_scores_as_batch_size_4(senv):
    """lm-eval's batch-size probe forwards made-up inputs that belong to no request: they run unselected."""
    args = f"pretrained={senv.model},method=premoe_taer,ratio=0.5,{senv.calib},max_batch_size=8"
    auto = evaluate(senv, "pruned_moe", args, tasks=("tiny_mc",), batch_size="auto")
    four = evaluate(senv, "pruned_moe", args, tasks=("tiny_mc",), batch_size=4)
    torch.testing.assert_close(torch.tensor(loglikelihoods(auto)), torch.tensor(loglikelihoods(four)),
                               rtol=1e-5, atol=1e-5)
    assert auto["config"]["moebench"]["keep_frequency"] == four["config"]["moebench"]["keep_frequency"]


def _lm(senv, method, **params):
    from moebench.eval.model import PrunedMoELM

    lm = PrunedMoELM(pretrained=senv.model, method=method, ratio=0.5, device="cpu", batch_size=4,
                     **dict(kv.split("=", 1) for kv in senv.calib.split(",")), **params)
    lm._prepare()
    return lm


def test_selection_never_reads_the_continuation(senv, monkeypatch):
    """Same context + different continuations: one selection, from the context tokens only.

    The scores equal a forward masked with the context's selection, and differ from one masked with
    the selection the context + continuation would get (so reading the continuation would fail this).
    """
    import moebench.method.apply as ls
    from moebench.method.select import context_signature
    from moebench.moe.ops import sample_mask

    # Every layer's top-2 markers as the key: on this random tiny model the released key (the first
    # layer's top-1 markers) retrieves the same task whatever the continuation, which would hide a leak.
    lm = _lm(senv, "premoe_taer", key="all", k=2)
    seen = []
    monkeypatch.setattr(ls, "context_signature", lambda model, toks, layers=None: seen.append(list(toks)) or
                        context_signature(model, toks, layers))
    context = [5 + (i % 25) for i in range(12)]  # words of the first calibration task
    conts = {}
    for first in range(60, 92):  # find a continuation that would move the selection to another task
        cont = [first] + [60 + (i * 7) % 32 for i in range(30)]
        full = lm.applied.selector.select(context_signature(lm.model, context + cont))
        if full != lm.applied.selector.select(context_signature(lm.model, context)):
            conts["far"], conts["far_keep"] = cont, full
            break
    assert "far" in conts, "no continuation changes the selection: the test could not detect a leak"
    conts["near"] = [6, 7, 8]
    reqs = [(("c", "x"), context, conts["far"]), (("c", "y"), context, conts["near"])]
    scores = lm._loglikelihood_tokens(reqs)
    assert seen == [context]  # only the context, once for both continuations

    def score(keep, cont):
        inp = torch.tensor([context + cont[:-1]])
        with torch.no_grad(), sample_mask(lm.model, [keep]):
            logp = torch.log_softmax(lm.model(input_ids=inp).logits[0, -len(cont):], -1)
        return float(logp.gather(1, torch.tensor(cont)[:, None]).sum())

    keep_ctx = lm._selections[tuple(context)]
    assert scores[0][0] == pytest.approx(score(keep_ctx, conts["far"]), abs=1e-4)
    assert scores[0][0] != pytest.approx(score(conts["far_keep"], conts["far"]), abs=1e-4)


def test_allocate_keeps_top_k_and_meets_the_budget():
    from moebench.method.select import allocate

    scores = torch.tensor([[5.0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [9, 0, 0, 0, 0, 0]])
    counts = allocate(scores, [2, 2, 2], [3, 3, 3], [None, None, None])
    assert sum(counts) == 9 and min(counts) >= 2 and counts[1] > 2


def test_retrieval_picks_the_query_domain_on_the_testbed(tmp_path):
    """premoe_taer: the nearest stored pattern is the query's own calibration domain (testbed-8e)."""
    from transformers import AutoTokenizer

    from moebench.method.pipeline import PlanRequest, make_plan
    from moebench.method.select import context_signature, selector_from_plan
    from moebench.moe.checkpoint import load_model
    from moebench.testbed.data import items
    from moebench.testbed.domains import DOMAINS
    from moebench.testbed.zoo import resolve_model

    model, tok = load_model("testbed-8e"), AutoTokenizer.from_pretrained(resolve_model("testbed-8e"))
    request = PlanRequest(method="premoe_taer", ratio=0.5, calib="testbed:domains", calib_samples=16,
                          calib_seq_len=128, stats_dir=str(tmp_path))
    plan = make_plan(model, tok, request, progress=False)
    selector = selector_from_plan(plan)
    tasks = [p["task"] for p in plan.selector["patterns"]]
    assert tasks == [f"testbed:{d}" for d in DOMAINS]
    for domain in DOMAINS:
        queries = [tok(it.prompt, add_special_tokens=False)["input_ids"] for it in items(domain, "eval", 10, seed=1)]
        hits = [tasks[selector.nearest(context_signature(model, q))] == f"testbed:{domain}" for q in queries]
        assert sum(hits) >= 9, f"{domain}: {sum(hits)}/10 queries retrieved their own domain's pattern"


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_offload_output_equals_on_device_output(model_type):
    from moebench.moe.kernels import KERNEL_NAME, register
    from moebench.moe.offload import ExpertOffloader
    from moebench.moe.ops import sample_mask
    from moebench.moe.view import MoEView

    model = tiny_model(model_type)
    view = MoEView(model)
    ids = sample_ids(batch=2, length=10)
    keeps = [{i: [0, 1, 2, 3] for i in view.indices}, {i: [0, 2, 4, 6] for i in view.indices}]
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        register()
        model.set_experts_implementation(KERNEL_NAME)  # the same kernel on device: bit-exact comparison
        plain = model(input_ids=ids).logits
        torch.testing.assert_close(plain, eager, rtol=1e-5, atol=1e-5)
        with sample_mask(model, keeps):
            masked = model(input_ids=ids).logits
    unpruned = view.expert_bytes()
    off = ExpertOffloader(model)
    assert view.expert_bytes() == 0  # nothing resident outside the working sets
    n_layers, per_expert = len(view.layers), unpruned // len(view.layers) // 8
    with torch.no_grad():
        for _ in range(2):  # union of the rows' selections: 6 experts per layer; the 2nd batch hits them all
            with off.batch(keeps), sample_mask(model, keeps):
                torch.testing.assert_close(model(input_ids=ids).logits, masked, rtol=0, atol=0)
        c = dict(off.counters)
        assert c["resident_bytes_peak"] == c["resident_bytes"] == 6 * per_expert * n_layers < unpruned
        assert c["bytes_moved"] == c["resident_bytes"] and c["hits"] == 6 * n_layers and c["hit_rate"] == 0.5
        assert c["prefetched"] == 6 * (n_layers - 1) and c["at_entry"] == 6 and c["on_demand"] == 0
        with off.batch(None):  # no selection known: routed experts outside the working set come on demand
            torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
        assert off.counters["on_demand"] > 0
    off.close()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)


def test_offload_through_pruned_moe(senv):
    """offload=true: the same scores as on device; resident expert bytes and traffic in the record."""
    args = f"pretrained={senv.model},method=premoe_taer,ratio=0.5,{senv.calib}"
    on_device = evaluate(senv, "pruned_moe", args, tasks=("tiny_mc", "tiny_gen"))
    offloaded = evaluate(senv, "pruned_moe", args + ",offload=true", tasks=("tiny_mc", "tiny_gen"))
    torch.testing.assert_close(torch.tensor(loglikelihoods(offloaded)), torch.tensor(loglikelihoods(on_device)),
                               rtol=1e-5, atol=1e-5)
    assert [s["resps"] for s in offloaded["samples"]["tiny_gen"]] == \
        [s["resps"] for s in on_device["samples"]["tiny_gen"]]
    c = offloaded["config"]["moebench"]["offload"]
    assert 0 < c["resident_bytes_peak"] < c["unpruned_expert_bytes"] and c["bytes_moved"] > 0
    assert 0 <= c["hit_rate"] <= 1 and c["on_demand"] == 0


def test_signature_pass_stops_at_the_last_layer_the_selector_reads(senv):
    """TAER's key is the first MoE layer's pattern: its signature pass runs no expert at all."""
    from moebench.method.select import context_signature
    from moebench.moe.view import MoEView

    lm = _lm(senv, "premoe_taer")
    view = MoEView(lm.model)
    ran = []
    hooks = [layer.experts.register_forward_hook(lambda m, a, o, i=layer.index: ran.append(i)) for layer in view.layers]
    try:
        tokens = list(range(5, 25))
        lm.applied.select(tokens)
        assert ran == [] and lm.applied.selector.needed_layers == [view.indices[0]]
        full = context_signature(lm.model, tokens)  # every router's logits: the last layer's experts need not run
        assert sorted(full) == view.indices and ran == view.indices[:-1]
        early = context_signature(lm.model, tokens, [view.indices[0]])
        assert list(early) == [view.indices[0]] and torch.equal(early[view.indices[0]], full[view.indices[0]])
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_statistics_of_a_model_offloaded_at_load_equal_the_resident_model(model_type):
    """offload=true on a GPU loads the model in host memory and moves only the non-expert weights to the device
    (`ExpertOffloader.onto`); the calibration of a select method then runs with the experts streamed from the host
    store, and must see what the resident model shows (here the device is the CPU: the same code path)."""
    from moebench.calib.stats import CollectSettings, collect
    from moebench.moe.offload import ExpertOffloader
    from moebench.moe.view import MoEView

    model = tiny_model(model_type)
    ids = sample_ids(batch=3, length=10)
    settings = CollectSettings(batch_size=2, subsample_tokens=12)
    groups = ["logits", "routing", "outputs"]  # what premoe_taer and prep read
    resident = collect(model, ids, groups, settings, progress=False)
    off = ExpertOffloader.onto(model, "cpu")
    assert MoEView(model).expert_bytes() == 0 and off.host_bytes > 0
    streamed = collect(model, ids, groups, settings, progress=False)
    assert sorted(streamed) == sorted(resident)
    for i in resident:
        for name, t in resident[i].items():
            torch.testing.assert_close(streamed[i][name], t, rtol=1e-5, atol=1e-6, msg=f"{i} {name}")
    off.close()
