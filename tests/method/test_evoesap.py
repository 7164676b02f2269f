"""EvoESAP against the authors' search (ZongfangLiu/EvoESAP, src/reap/search_utils.py), the fitness
against direct computations, the budget and bounds, and uniform budgets on the trained testbed.

`Authors` below is a literal transcription, in our words, of the authors' search: the initial patterns
(``_pattern_weights``), the allocation (``_allocate_budget``), the parity constraints of
``mutation_even_experts`` (``_normalize_parities``), the mutation (``mutate_plan``) and the elitist,
mutation-only loop (``evolutionary_search``), driven by Python's ``random.Random(seed)`` as theirs is.
Fed the same deterministic float64 fitness, moebench's search must score the same plans in the same
order and pick the same plan.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from parity_reference import differentiated_model, keep_by_score
from tiny_models import sample_ids, tiny_model

import moebench.methods.evoesap as evo
from moebench.calib.stats import CollectSettings, collect
from moebench.method.pipeline import plan_from_stats
from moebench.method.registry import get_method, resolve_budget
from moebench.moe.ops import prune
from moebench.moe.view import MoEView

# ----- the authors' search, transcribed ------------------------------------------------------------------------


class Authors:
    """The authors' search as their code runs it (plans count removed experts per layer)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def weights(self, pattern: str, n: int) -> list[float]:
        mid = (n - 1) / 2
        cutoff = max(1, n // 4)
        if pattern == "random":
            return [self.rng.random() + 1e-4 for _ in range(n)]
        table = {"up": [i + 1 for i in range(n)], "down": [n - i for i in range(n)],
                 "mid": [mid - abs(i - mid) + 1 for i in range(n)], "mid-neg": [abs(i - mid) + 1 for i in range(n)],
                 "front-heavy": [0.7 ** i + 1e-4 for i in range(n)], "back-heavy": [1.3 ** i for i in range(n)],
                 "block-early": [2.0 if i < cutoff else 1.0 for i in range(n)],
                 "block-late": [2.0 if i >= n - cutoff else 1.0 for i in range(n)],
                 "alt": [2.0 if i % 2 == 0 else 1.0 for i in range(n)],
                 "deep-flat": [0.5 + 0.5 * (1 - abs(2 * i / max(n - 1, 1) - 1)) for i in range(n)]}
        return table.get(pattern, [1.0] * n)

    @staticmethod
    def allocate(weights, capacities, budget):
        n = len(capacities)
        total_weight = float(sum(weights)) or float(n)
        desired = [budget * (w / total_weight) for w in weights]
        alloc = [min(int(d), capacities[i]) for i, d in enumerate(desired)]
        fractional = sorted([(i, desired[i] - alloc[i]) for i in range(n) if alloc[i] < capacities[i]],
                            key=lambda item: item[1], reverse=True)
        remaining = budget - sum(alloc)
        for i, _ in fractional:
            if remaining <= 0:
                break
            alloc[i] += 1
            remaining -= 1
        while remaining > 0:
            progressed = False
            for i in range(n):
                if remaining > 0 and alloc[i] < capacities[i]:
                    alloc[i] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                break
        assert sum(alloc) == budget
        return alloc

    @staticmethod
    def parities(totals, capacities, budget):
        base = [t % 2 for t in totals]
        assert all(b <= c for b, c in zip(base, capacities, strict=True)) and budget >= sum(base)
        assert (budget - sum(base)) % 2 == 0
        assert budget <= sum(b + 2 * ((c - b) // 2) for b, c in zip(base, capacities, strict=True))
        return base

    def init(self, pattern, capacities, budget, parities=None):
        w = self.weights(pattern, len(capacities))
        if parities is None:
            return self.allocate(w, capacities, budget)
        room = [(c - p) // 2 for c, p in zip(capacities, parities, strict=True)]
        halves = self.allocate(w, room, (budget - sum(parities)) // 2)
        return [p + 2 * h for p, h in zip(parities, halves, strict=True)]

    def mutate(self, plan, capacities, max_delta, times, attempts, even):
        child, ok, tries = list(plan), 0, 0
        want = min(self.rng.randint(1, max(times, 1)), self.rng.randint(1, max(times, 1)))
        even_cap = max_delta if max_delta % 2 == 0 else max_delta - 1
        while ok < want and tries < attempts:
            tries += 1
            down = [i for i, v in enumerate(child) if v > 0]
            up = [i for i, cap in enumerate(capacities) if child[i] < cap]
            if not down or not up:
                break
            src = self.rng.choice(down)
            dst = self.rng.choice(up)
            if src == dst and len(up) > 1:
                continue
            if even:
                if even_cap < 2:
                    break
                delta = self.rng.randrange(2, even_cap + 1, 2)
            else:
                delta = self.rng.randint(1, max(max_delta, 1))
            if child[src] - delta < 0 or child[dst] + delta > capacities[dst]:
                continue
            child[src] -= delta
            child[dst] += delta
            ok += 1
        return child

    def search(self, capacities, budget, fitness, s: evo.Search, maximize, totals=None):
        """(best plan, best score, every plan scored in order): the authors' loop, children made even after
        the last generation as their code does (they are never scored)."""
        parities = self.parities(totals, capacities, budget) if s.even else None
        size = max(s.population, len(s.patterns), 1)
        survivors = max(1, min(s.topk, size))
        population = [self.init(p, capacities, budget, parities) for p in s.patterns]
        fill = "uniform" if s.patterns and all(p == "uniform" for p in s.patterns) else "random"
        while len(population) < size:
            population.append(self.init(fill, capacities, budget, parities))
        cache, order = {}, []
        best, best_score = None, -math.inf if maximize else math.inf
        for _gen in range(s.generations):
            scored = []
            for plan in population:
                key = tuple(plan)
                if key not in cache:
                    cache[key] = fitness(plan)
                    order.append((key, cache[key]))
                scored.append((cache[key], plan))
            scored.sort(key=lambda item: item[0], reverse=maximize)
            if (scored[0][0] > best_score) if maximize else (scored[0][0] < best_score):
                best, best_score = list(scored[0][1]), scored[0][0]
            elites = [plan for _, plan in scored[:survivors]]
            population = list(elites)
            while len(population) < size:
                population.append(self.mutate(self.rng.choice(elites), capacities, s.max_delta, s.mutation_times,
                                              s.max_attempts, s.even))
        return best, best_score, order


def smooth(plan) -> float:
    """A deterministic float64 fitness with a unique optimum: layer i dislikes removals by weight w_i."""
    u = torch.tensor(plan, dtype=torch.float64)
    w = 1.0 + torch.arange(len(plan), dtype=torch.float64).remainder(5)
    return float((w * u ** 2).sum() + 0.37 * torch.sin(1.3 * u * (1 + torch.arange(len(plan)))).sum())


def tied(plan) -> float:
    """An integer-valued fitness (many ties: the order among equals must match too)."""
    return float(sum(abs(v - (i % 3)) for i, v in enumerate(plan)))


CASES = {  # name: (capacities, budget, totals, settings)
    "defaults-olmoe-16-of-64": ([56] * 16, 256, [64] * 16, evo.Search()),
    "readme-example": ([56] * 16, 256, [64] * 16, evo.Search(32, 50, 4, 4, 3, 32)),
    "small-many-repeats": ([6, 6, 6], 6, [8, 8, 8], evo.Search(6, 10, 2, 2, 2, 8)),
    "uneven-capacities": ([3, 7, 1, 5, 6], 9, [5, 9, 3, 7, 8], evo.Search(5, 8, 3, 3, 2, 16)),
    "even-experts": ([6, 7, 6, 7], 10, [8, 9, 8, 9], evo.Search(8, 6, 4, 4, 2, 32, even=True)),
    "uniform-only": ([6] * 6, 12, [8] * 6, evo.Search(4, 6, 2, 2, 1, 32, patterns=("uniform",))),
}


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("seed", [0, 42])
@pytest.mark.parametrize("case", sorted(CASES))
def test_search_follows_the_authors(case, seed, maximize):
    capacities, budget, totals, settings = CASES[case]
    for fitness in (smooth, tied):
        best, score, order = Authors(seed).search(capacities, budget, fitness, settings, maximize, totals)
        ours = evo.evolve(capacities, budget, fitness, random.Random(seed), settings, maximize, totals)
        assert ours.scored == order  # the same plans scored, in the same order, with the same fitness
        assert ours.best == best and ours.fitness == score
        assert len(ours.history) == settings.generations


def test_every_scored_plan_respects_the_budget_and_bounds():
    rng = random.Random(7)
    for trial in range(30):
        n = rng.randint(1, 9)
        capacities = [rng.randint(0, 12) for _ in range(n)]
        budget = rng.randint(0, sum(capacities))
        settings = evo.Search(rng.randint(1, 10), rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 5),
                              rng.randint(1, 4), rng.randint(1, 40))
        found = evo.evolve(capacities, budget, smooth, random.Random(trial), settings, maximize=False)
        for plan, _ in found.scored:
            assert sum(plan) == budget, (trial, plan)
            assert all(0 <= v <= c for v, c in zip(plan, capacities, strict=True)), (trial, plan)


def test_even_keeps_every_count_even():
    totals, capacities = [8, 9, 8, 9], [6, 7, 6, 7]
    found = evo.evolve(capacities, 10, smooth, random.Random(3), evo.Search(8, 6, even=True, max_delta=4), False,
                       totals)
    assert all((t - v) % 2 == 0 for plan, _ in found.scored for t, v in zip(totals, plan, strict=True))


# ----- the planner: kept sets from the search, the budget, the bounds --------------------------------------------

def family_setup(family: str, layers: int = 6):
    overrides = {"num_hidden_layers": layers + (1 if family in ("deepseek_v3", "qwen3_moe") else 0)}
    if family == "qwen3_moe":
        overrides["mlp_only_layers"] = [0]
    model = tiny_model(family, **overrides)
    stats = collect(model, sample_ids(4, 16), ["routing", "norms"], CollectSettings(), progress=False)
    return model, MoEView(model), stats


class InjectedFitness:
    """Stands in for `evoesap.SearchSet`: the fitness of the removed counts per layer, by ``smooth``."""

    def __init__(self, model, tokens, fitness, batch_tokens=evo.SEARCH_TOKENS):
        self.view, self.shape = MoEView(model), tuple(tokens.shape)

    def __call__(self, keep):
        if keep is None:
            return 0.0
        return smooth([layer.num_experts - len(keep[layer.index]) for layer in self.view.layers])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_planner_keeps_the_authors_plan_and_the_best_scored_experts(family, monkeypatch):
    """With the fitness injected, the planner's per-layer budgets are the authors' search's best plan
    (in units of one expert per routing group), and each layer keeps its best experts by REAP."""
    monkeypatch.setattr(evo, "SearchSet", InjectedFitness)
    _model, view, stats = family_setup(family)
    budget = resolve_budget(view, ratio=0.5)
    plan = plan_from_stats(view, "evoesap", {"population": 6, "generations": 5}, budget, stats, seed=5, ratio=0.5,
                           extra={"calibration_tokens": sample_ids(2, 8)})
    step = view.layers[0].groups[0] if view.layers[0].groups else 1
    least = 4 if family == "deepseek_v3" else 2  # per group >= top_k / topk_group = 2 with 2 groups; top_k = 2
    capacities = [(layer.num_experts - least) // step for layer in view.layers]
    removed = sum(layer.num_experts - budget[layer.index] for layer in view.layers) // step
    best, score, _ = Authors(5).search(capacities, removed, lambda u: smooth([v * step for v in u]),
                                       evo.Search(6, 5), maximize=False)
    assert [layer.num_experts - len(plan.keep[layer.index]) for layer in view.layers] == [v * step for v in best]
    assert plan.extra["search"]["best_fitness"] == score
    for layer in view.layers:  # REAP: mean over routed tokens of gate x output norm
        s = stats[layer.index]
        reap = s["gate_norm_sum"] / s["norm_count"].clamp_min(1)
        assert plan.keep[layer.index] == keep_by_score(reap, len(plan.keep[layer.index]), layer.groups)


@pytest.mark.parametrize("family,params", [("mixtral", {}), ("deepseek_v3", {"fitness": "esap"}),
                                           ("qwen3_moe", {"even": True}), ("olmoe", {"score": "frequency"})])
def test_plan_respects_the_total_budget_and_per_layer_bounds(family, params):
    _model, view, stats = family_setup(family)
    for ratio in (0.25, 0.5):
        budget = resolve_budget(view, ratio=ratio)
        plan = plan_from_stats(view, "evoesap", {"population": 4, "generations": 3, **params}, budget, stats,
                               ratio=ratio, extra={"calibration_tokens": sample_ids(3, 10)})
        kept = plan.experts_kept()
        assert sum(kept.values()) == sum(budget.values())
        for layer in view.layers:
            assert layer.top_k <= kept[layer.index] <= layer.num_experts
            if layer.groups:  # equal drops per group, enough per group for top_k within topk_group groups
                per = [sum(1 for e in plan.keep[layer.index] if e // 4 == g) for g in range(2)]
                assert per[0] == per[1] and per[0] * layer.groups[1] >= layer.top_k
        if params.get("even"):
            assert all(k % 2 == 0 for k in kept.values())
        search = plan.extra["search"]
        assert len(search["generations"]) == 3
        fits = [g["best_fitness"] for g in search["generations"]]
        better = (lambda a, b: a >= b) if search["higher_is_better"] else (lambda a, b: a <= b)
        assert all(better(b, a) for a, b in itertools.pairwise(fits))  # elitist: never worse
        assert better(search["best_fitness"], search["uniform_fitness"])


def test_deterministic_with_the_seed():
    _model, view, stats = family_setup("mixtral")
    budget = resolve_budget(view, ratio=0.5)
    args = ({"population": 4, "generations": 3}, budget, stats)
    extra = {"calibration_tokens": sample_ids(3, 10)}
    a = plan_from_stats(view, "evoesap", *args, seed=1, extra=extra)
    assert a.to_json() == plan_from_stats(view, "evoesap", *args, seed=1, extra=extra).to_json()


def test_refusals():
    _model, view, stats = family_setup("mixtral", layers=2)
    budget, extra = resolve_budget(view, ratio=0.25), {"calibration_tokens": sample_ids(2, 8)}
    with pytest.raises(ValueError, match="must be a score method"):
        plan_from_stats(view, "evoesap", {"score": "grape"}, budget, stats, extra=extra)
    with pytest.raises(ValueError, match=r"unknown initial pattern 'unifrom'.*uniform"):
        plan_from_stats(view, "evoesap", {"init": "unifrom"}, budget, stats, extra=extra)
    with pytest.raises(ValueError, match="give a calibration source"):
        plan_from_stats(view, "evoesap", {}, budget, stats)
    with pytest.raises(ValueError, match="runs the whole model"):
        get_method("evoesap").check_sequential({})
    assert "routing" in get_method("evoesap").needs_for({"score": "random"})  # calibration is always required


# ----- the fitness against direct computations -----------------------------------------------------------------

KEEPS = {"mixtral": {0: [0, 2, 3, 5, 6, 7], 1: [1, 4, 6, 7]},
         "qwen3_moe": {1: [0, 1, 2, 3, 4, 5, 6], 2: [2, 3, 5]},
         "deepseek_v3": {1: [0, 1, 2, 4, 5, 6], 2: [0, 3, 4, 7]}}


@pytest.mark.parametrize("family", sorted(KEEPS))
def test_fitness_equals_a_direct_computation(family, monkeypatch):
    """nll: the pruned model's own language-model loss (labels = inputs); esap: the float64 mean over
    positions of sum_v min(p, q), p the unpruned and q the physically pruned model. Batching and the
    cache do not change either."""
    tokens, keep = sample_ids(6, 12, seed=4), KEEPS[family]
    base, pruned = differentiated_model(family), differentiated_model(family)
    prune(pruned, keep)
    with torch.no_grad():
        loss = pruned(input_ids=tokens, labels=tokens).loss.double()
        p = torch.softmax(base(input_ids=tokens).logits.double(), -1)
        q = torch.softmax(pruned(input_ids=tokens).logits.double(), -1)
    esap = torch.minimum(p, q).sum(-1).mean()
    for batch_tokens in (evo.SEARCH_TOKENS, 12, 30):  # one batch, one sequence a batch, two a batch
        nll = evo.SearchSet(base, tokens, "nll", batch_tokens)(keep)
        assert abs(nll - loss) <= 1e-5 * abs(loss)
        assert abs(evo.SearchSet(base, tokens, "esap", batch_tokens)(keep) - esap) <= 1e-5
    monkeypatch.setattr(evo, "ESAP_CACHE_BYTES", 0)  # the unpruned model recomputed beside each candidate
    recomputed = evo.SearchSet(base, tokens, "esap", 30)
    assert recomputed.reference is None and abs(recomputed(keep) - esap) <= 1e-5
    assert abs(evo.SearchSet(base, tokens, "esap")(None) - 1.0) <= 1e-6


# ----- the trained testbed: searched budgets against uniform ones ----------------------------------------------

@pytest.mark.parametrize("fitness", ["nll", "esap"])
def test_beats_or_equals_uniform_on_the_testbed(fitness, tmp_path):
    """testbed-8e (a trained 4-layer Mixtral), REAP within layers, 50% removed: the searched budgets' fitness
    is at least the uniform budget's, which is REAP's plan at the same ratio scored the same way."""
    from transformers import AutoTokenizer

    from moebench.method.pipeline import PlanRequest, make_plan
    from moebench.moe.checkpoint import load_model
    from moebench.testbed.zoo import resolve_model

    model, tok = load_model("testbed-8e"), AutoTokenizer.from_pretrained(resolve_model("testbed-8e"))
    request = PlanRequest(method="evoesap", ratio=0.5, calib="testbed:mix", calib_samples=16, calib_seq_len=64,
                          stats_dir=str(tmp_path), params={"fitness": fitness})
    plan = make_plan(model, tok, request, progress=False)
    search = plan.extra["search"]
    assert plan.calib == "testbed-mix-16x64-s0" and search["search_set"] == [16, 64]
    assert sum(plan.experts_kept().values()) == 16
    uniform = make_plan(model, tok, PlanRequest(method="reap", ratio=0.5, calib="testbed:mix", calib_samples=16,
                                                calib_seq_len=64, stats_dir=str(tmp_path)), progress=False)
    from moebench.method.pipeline import calibration_for

    judge = evo.SearchSet(model, calibration_for(request).tokens(tok), fitness)
    assert search["uniform_fitness"] == pytest.approx(judge(uniform.keep), rel=1e-6)
    assert search["best_fitness"] == pytest.approx(judge(plan.keep), rel=1e-6)
    if fitness == "nll":
        assert search["best_fitness"] <= search["uniform_fitness"]
        assert search["unpruned_fitness"] <= search["best_fitness"]
    else:
        assert search["best_fitness"] >= search["uniform_fitness"]
