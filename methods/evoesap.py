"""EvoESAP: evolutionary search over per-layer expert budgets (Liu et al., arXiv 2603.06003)."""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from moebench.method.plan import Plan
from moebench.method.registry import get_method, planner
from moebench.moe.ops import sample_mask
from moebench.util import did_you_mean, on_terminal

PAPER = ("Liu et al. 2026, 'EvoESAP: Non-Uniform Expert Pruning for Sparse MoE', arXiv 2603.06003 "
         "(code: ZongfangLiu/EvoESAP)")
# The authors' default initial patterns (src/reap/args.py, DEFAULT_INIT_PATTERNS), in their order.
PATTERNS = ("uniform", "random", "up", "down", "mid", "mid-neg", "front-heavy", "back-heavy", "block-early",
            "block-late", "alt", "deep-flat")
SEARCH_TOKENS = 4096  # tokens per forward pass on the search set (the authors: one 4096-token sequence)
ESAP_CACHE_BYTES = 1 << 30  # the unpruned model's probabilities are cached up to this size, else recomputed


# ----- the search (the authors' search_utils.py, transcribed; plans count removed units per layer) -----------

def pattern_weights(pattern: str, n: int, rng: random.Random) -> list[float]:
    """How an initial pattern shares the removals over ``n`` layers (relative weights; ``random`` draws)."""
    mid, cut = (n - 1) / 2, max(1, n // 4)
    shapes = {
        "random": lambda i: rng.random() + 1e-4, "up": lambda i: i + 1, "down": lambda i: n - i,
        "mid": lambda i: mid - abs(i - mid) + 1, "mid-neg": lambda i: abs(i - mid) + 1,
        "front-heavy": lambda i: 0.7 ** i + 1e-4, "back-heavy": lambda i: 1.3 ** i,
        "block-early": lambda i: 2.0 if i < cut else 1.0, "block-late": lambda i: 2.0 if i >= n - cut else 1.0,
        "alt": lambda i: 2.0 if i % 2 == 0 else 1.0,
        "deep-flat": lambda i: 0.5 + 0.5 * (1 - abs(2 * i / max(n - 1, 1) - 1)),
    }
    return [shapes.get(pattern, lambda i: 1.0)(i) for i in range(n)]


def allocate(weights: list[float], capacities: list[int], total: int) -> list[int]:
    """``total`` removals shared in proportion to ``weights``, at most ``capacities[i]`` in layer i: whole
    parts first, then one more each by largest fractional part, then round-robin where room is left."""
    share = sum(weights) or float(len(weights))
    wanted = [total * w / share for w in weights]
    counts = [min(int(x), c) for x, c in zip(wanted, capacities, strict=True)]
    open_layers = sorted((i for i in range(len(counts)) if counts[i] < capacities[i]),
                         key=lambda i: wanted[i] - counts[i], reverse=True)
    left = total - sum(counts)
    for i in open_layers[:max(left, 0)]:
        counts[i] += 1
    left = total - sum(counts)
    while left > 0 and any(c < cap for c, cap in zip(counts, capacities, strict=True)):
        for i in range(len(counts)):
            if left > 0 and counts[i] < capacities[i]:
                counts[i], left = counts[i] + 1, left - 1
    if sum(counts) != total:
        raise ValueError(f"evoesap: cannot place {total} removals within the capacities {capacities}")
    return counts


def even_base(totals: list[int], capacities: list[int], total: int) -> list[int]:
    """Per layer the removals (0 or 1) that leave an even count (``even=true``); checks that ``total`` fits."""
    base = [t % 2 for t in totals]
    room = sum(b + 2 * ((c - b) // 2) for b, c in zip(base, capacities, strict=True))
    if any(b > c for b, c in zip(base, capacities, strict=True)) or total < sum(base) \
            or (total - sum(base)) % 2 or total > room:
        raise ValueError(f"evoesap: even=true cannot place {total} removals leaving even counts "
                         f"(per-layer parity {base}, capacities {capacities})")
    return base


def initial_plan(pattern: str, capacities: list[int], total: int, rng: random.Random,
                 base: list[int] | None = None) -> list[int]:
    """The removals of one initial pattern (``base``: the per-layer parities of ``even=true``)."""
    weights = pattern_weights(pattern, len(capacities), rng)
    if base is None:
        return allocate(weights, capacities, total)
    pairs = allocate(weights, [(c - b) // 2 for c, b in zip(capacities, base, strict=True)], (total - sum(base)) // 2)
    return [b + 2 * p for b, p in zip(base, pairs, strict=True)]


def mutate(plan: list[int], capacities: list[int], rng: random.Random, max_delta: int, times: int, attempts: int,
           even: bool = False) -> list[int]:
    """A child of ``plan``: up to min(U(1, times), U(1, times)) level switches, each moving delta removals
    (1..max_delta; even deltas with ``even``) from a random layer to another with room; at most ``attempts`` tries."""
    child, done, tried = list(plan), 0, 0
    target = min(rng.randint(1, max(times, 1)), rng.randint(1, max(times, 1)))
    top_even = max_delta - max_delta % 2
    while done < target and tried < attempts:
        tried += 1
        givers = [i for i, v in enumerate(child) if v > 0]
        takers = [i for i, c in enumerate(capacities) if child[i] < c]
        if not givers or not takers:
            break
        src, dst = rng.choice(givers), rng.choice(takers)
        if src == dst and len(takers) > 1:
            continue
        if even and top_even < 2:
            break
        delta = rng.randrange(2, top_even + 1, 2) if even else rng.randint(1, max(max_delta, 1))
        if child[src] < delta or child[dst] + delta > capacities[dst]:
            continue
        child[src] -= delta
        child[dst] += delta
        done += 1
    return child


@dataclass(frozen=True)
class Search:
    """The search settings (defaults: the authors' args.py and experiments/search-pruning-cli.sh)."""

    population: int = 8
    generations: int = 4
    topk: int = 4
    max_delta: int = 2
    mutation_times: int = 1
    max_attempts: int = 32
    even: bool = False
    patterns: tuple[str, ...] = PATTERNS


@dataclass
class Result:
    """What `evolve` found: the best plan, its fitness, each generation's best, every plan scored in order."""

    best: list[int]
    fitness: float
    history: list[dict] = field(default_factory=list)
    scored: list[tuple[tuple[int, ...], float]] = field(default_factory=list)


def evolve(capacities: list[int], total: int, fitness, rng: random.Random, search: Search, maximize: bool,
           totals: list[int] | None = None, progress: bool = False) -> Result:
    """Mutation-only evolution over removal plans (``total`` removals, at most ``capacities[i]`` per layer).

    Generation 0: one plan per initial pattern, filled to the population with ``random`` (``uniform``
    if every pattern is uniform). Each generation scores its plans (a plan scored before is not run
    again), keeps the ``topk`` best as parents and fills the population with mutated children of
    parents drawn at random. ``fitness(plan) -> float``; ``totals``: experts per layer (``even``).
    """
    if sum(capacities) < total:
        raise ValueError(f"evoesap: {total} removals exceed the room of every layer together ({sum(capacities)})")
    base = even_base(totals or [], capacities, total) if search.even else None
    size = max(search.population, len(search.patterns), 1)
    keep_n = max(1, min(search.topk, size))
    fill = "uniform" if search.patterns and set(search.patterns) == {"uniform"} else "random"
    population = [initial_plan(p, capacities, total, rng, base) for p in search.patterns]
    population += [initial_plan(fill, capacities, total, rng, base) for _ in range(size - len(population))]
    seen: dict[tuple[int, ...], float] = {}
    result = Result(population[0], float("-inf") if maximize else float("inf"))
    bar = tqdm(range(search.generations), desc="evoesap search", unit="generation", disable=not progress)
    for gen in bar:
        for plan in population:
            key = tuple(plan)
            if key not in seen:
                seen[key] = float(fitness(plan))
                result.scored.append((key, seen[key]))
        ranked = sorted(population, key=lambda p: seen[tuple(p)], reverse=maximize)
        top = seen[tuple(ranked[0])]
        if (top > result.fitness) if maximize else (top < result.fitness):
            result.best, result.fitness = list(ranked[0]), top
        result.history.append({"generation": gen, "best_fitness": top, "best": list(ranked[0])})
        bar.set_postfix(best=f"{result.fitness:.4g}")
        parents = ranked[:keep_n]
        if gen == search.generations - 1:
            break
        population = [list(p) for p in parents]
        while len(population) < size:
            population.append(mutate(rng.choice(parents), capacities, rng, search.max_delta, search.mutation_times,
                                     search.max_attempts, search.even))
    return result


# ----- the fitness: teacher-forced forward passes of the masked model on the search set -----------------------

class SearchSet:
    """Fitness of kept sets on a fixed search set ``tokens [n, L]``, each forward under a routing mask.

    ``nll``: mean over the n (L - 1) predicted positions of -log q(x_{t+1} | x_<=t), q the pruned model
    (lower is better). ``esap``: mean over the n L positions of sum over the vocabulary of min(p, q), p
    the unpruned model (higher is better, 1 = identical). p is computed once and cached up to
    ``ESAP_CACHE_BYTES``, beyond that recomputed beside each candidate (memory stays one batch of logits).
    """

    def __init__(self, model, tokens: torch.Tensor, fitness: str, batch_tokens: int = SEARCH_TOKENS):
        self.model, self.fitness, self.shape = model, fitness, tuple(tokens.shape)
        self.device = model.get_input_embeddings().weight.device
        self.batches = list(tokens.split(max(1, batch_tokens // tokens.shape[1])))
        vocab = model.get_output_embeddings().weight.shape[0]
        self.reference = None
        if fitness == "esap" and tokens.numel() * vocab * 4 <= ESAP_CACHE_BYTES:
            self.reference = [torch.softmax(self._logits(ids), dim=-1).cpu() for ids in self.batches]

    def _logits(self, ids: torch.Tensor, keep: dict | None = None) -> torch.Tensor:
        """float32 logits ``[b, L, V]`` of ``ids [b, L]``, routing only among ``keep`` (None: every expert)."""
        with torch.no_grad(), (sample_mask(self.model, [keep] * len(ids)) if keep else nullcontext()):
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float()

    def __call__(self, keep: dict[int, list[int]] | None) -> float:
        """The fitness of routing among ``keep`` (MoE layer -> kept ids; None: the unpruned model)."""
        total, count = torch.zeros((), dtype=torch.float64), 0
        for i, ids in enumerate(self.batches):
            logits = self._logits(ids, keep)
            if self.fitness == "nll":
                target = ids[:, 1:].to(logits.device).unsqueeze(-1)  # -log q = logsumexp(z) - z_target
                nll = torch.logsumexp(logits[:, :-1], dim=-1) - logits[:, :-1].gather(-1, target).squeeze(-1)
                total += nll.double().sum().cpu()
                count += target.numel()
            else:
                p = self.reference[i].to(logits.device) if self.reference is not None \
                    else torch.softmax(self._logits(ids), dim=-1)
                total += torch.minimum(p, torch.softmax(logits, dim=-1)).sum(-1).double().sum().cpu()
                count += ids.numel()
        return float(total / count)


# ----- the planner --------------------------------------------------------------------------------------------

def _units(layers, budget: dict[int, int]) -> tuple[int, list[int], int]:
    """(unit size, removable units per layer, units the budget removes): a unit is one expert, or one per
    routing group where the router limits groups (equal drops per group)."""
    steps = {layer.groups[0] if layer.groups else 1 for layer in layers}
    if len(steps) > 1:
        raise ValueError(f"evoesap: MoE layers with different routing-group counts {sorted(steps)} are not supported")
    step = steps.pop()
    room = []
    for layer in layers:
        if layer.groups:  # per group: enough for top_k within topk_group groups, and for the group ranking
            n_group, topk_group = layer.groups
            least = n_group * max(-(-layer.top_k // topk_group), layer.family.group_score_top, 1)
        else:
            least = max(layer.top_k, 1)
        room.append(max(layer.num_experts - least, 0) // step)
    removed = sum(layer.num_experts - budget[layer.index] for layer in layers)
    return step, room, removed // step


def _patterns(init: str) -> tuple[str, ...]:
    names = PATTERNS if init.strip() == "all" else tuple(p.strip() for p in init.split(",") if p.strip())
    for name in names:
        if name not in PATTERNS:
            raise ValueError(f"evoesap: unknown initial pattern {name!r}{did_you_mean(name, PATTERNS)}; "
                             f"known: all, {', '.join(PATTERNS)}")
    return names


def search_tokens(ctx, samples: int) -> torch.Tensor:
    """The first ``samples`` calibration sequences ``[n, L]`` (``ctx.extra["calibration_tokens"]``)."""
    tokens = ctx.extra.get("calibration_tokens")
    if tokens is None:
        raise ValueError("evoesap scores candidates on calibration text: give a calibration source "
                         "(calib=c4, --calib testbed:mix, ...)")
    tokens = tokens() if callable(tokens) else tokens
    return tokens[:samples]


@planner("evoesap", needs=("routing",), extra_needs=lambda params: get_method(params["score"]).needs,
         bounds={"population": (1, None), "generations": (1, None), "topk": (1, None), "max_delta": (1, None),
                 "mutation_times": (1, None), "max_attempts": (1, None), "search_samples": (1, None)},
         global_budget=True, paper=PAPER,
         sequential="its search runs the whole model on the search set for every candidate",
         source="as the authors' code (search_utils.py: patterns, allocation, mutation, elitist selection; "
                "fitness nll = nll-full, esap = esp-dataset; defaults of args.py / search-pruning-cli.sh, so "
                "fitness=nll as their code, where the paper and the README's example use esap); ours: the search "
                "set = the first calibration sequences (theirs: a separate draw of 4096-token packed sequences), "
                "routing-group units, refusing unknown patterns, float32 probabilities, ties kept by lower id")
def evoesap(ctx, *, score: str = "reap", fitness: Literal["nll", "esap"] = "nll", population: int = 8,
            generations: int = 4, topk: int = 4, max_delta: int = 2, mutation_times: int = 1, max_attempts: int = 32,
            even: bool = False, init: str = "all", search_samples: int = 128):
    """Per-layer budgets under the uniform total, found by evolution; ``score`` orders experts within a layer.

    A candidate is the number of experts each MoE layer removes (the lowest by ``score``: any score
    method, default ``reap`` as the authors), the total fixed by the budget, every layer keeping at
    least top_k. Fitness, teacher-forced on the search set (the first ``search_samples`` calibration
    sequences x_1..x_L), with q the candidate (experts masked out of routing) and p the unpruned model:
    ``nll`` (default, the code's default ``nll-full``): mean over positions of -log q(x_{t+1} | x_<=t), lower
    is better; ``esap`` (the paper's Expected Speculative Acceptance Proxy, the code's ``esp-dataset``, used
    by the README's example): mean over every position t of sum_v min(p(v | x_<=t), q(v | x_<=t)) =
    1 - TV(p, q), the expected acceptance of q's draft token under speculative sampling by p; higher is
    better. Search (mutation only): generation 0 holds one plan per initial pattern (``init``: ``all``,
    the authors' 12, or a comma list: uniform, random, up, down, mid, mid-neg, front-heavy, back-heavy,
    block-early, block-late, alt, deep-flat; each shares the removals by layer weights, whole parts then
    largest remainders), filled to ``population`` (raised to the number of patterns, as the code does)
    with random ones; each of ``generations`` scores the plans, keeps the ``topk`` best and adds children
    of random parents: min(U(1,T), U(1,T)) moves (T = ``mutation_times``) of 1..``max_delta`` removals
    from one layer to another within bounds, at most ``max_attempts`` tries; ``even``: even moves and
    counts. Seeded by the request seed (Python's ``random``, as the code). ``plan.extra["search"]``
    records each generation's best fitness, the uniform budget's and the unpruned model's.
    Routing groups: one unit is one expert per group. Forward passes only, one batch of logits at a time.
    """
    scorer = get_method(score)
    if not scorer.scoring:
        raise ValueError(f"evoesap: score={score!r} must be a score method (e.g. reap, frequency, ean)")
    layers = list(ctx.view.layers)
    step, room, removed = _units(layers, ctx.budget)
    scores = {layer.index: scorer.fn(ctx, layer) for layer in layers}

    def keep_of(units: list[int]) -> dict[int, list[int]]:
        return {layer.index: ctx.keep_best(layer, scores[layer.index], layer.num_experts - u * step)
                for layer, u in zip(layers, units, strict=True)}

    judge = SearchSet(ctx.view.model, search_tokens(ctx, search_samples), fitness)
    settings = Search(population, generations, topk, max_delta, mutation_times, max_attempts, even, _patterns(init))
    found = evolve(room, removed, lambda units: judge(keep_of(units)), random.Random(ctx.seed), settings,
                   maximize=fitness == "esap", totals=[layer.num_experts // step for layer in layers],
                   progress=on_terminal())
    uniform = tuple((layer.num_experts - ctx.budget[layer.index]) // step for layer in layers)
    seen = dict(found.scored)
    record = {"fitness": fitness, "higher_is_better": fitness == "esap", "search_set": list(judge.shape),
              "layers": [layer.index for layer in layers],
              "generations": [{"generation": h["generation"], "best_fitness": h["best_fitness"],
                               "removed": [u * step for u in h["best"]]} for h in found.history],
              "best_fitness": found.fitness, "candidates_scored": len(found.scored),
              "uniform_fitness": seen[uniform] if uniform in seen else judge(keep_of(list(uniform)))}
    if fitness == "nll":  # (the unpruned model's esap is 1 by definition)
        record["unpruned_fitness"] = judge(None)
    return Plan("evoesap", "prune", keep=keep_of(found.best), extra={"search": record})
