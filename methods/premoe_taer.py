"""PreMoE task-adaptive expert retrieval (TAER), following PreMoE v1 (arXiv 2505.17639v1).

Pei et al., 'PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval'
(v1: Probabilistic Expert Pruning with TCESS + Task-Adaptive Expert Retrieval). We follow v1;
v3 (PEU, 'Proactive Inference') changes the score, not the retrieval.
"""

from __future__ import annotations

from typing import Literal

from moebench.method.plan import Plan
from moebench.method.registry import planner, select_top
from moebench.method.select import topk_marker

PAPER = ("Pei et al., 'PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval', "
         "arXiv 2505.17639 v1 (TCESS + TAER)")


def key_layers(ctx, key: str) -> list[int]:
    """MoE layers whose TCESS vectors form the retrieval key: the first only, or all of them."""
    indices = [layer.index for layer in ctx.view.layers]
    return indices[:1] if key == "first" else indices


def task_pattern(ctx, stats: dict, *, k: int, r: float, key: str = "first") -> tuple[list[float], dict, dict]:
    """One task's pattern: index vector [E] (first MoE layer) or [L*E], per-layer TCESS scores [E], kept ids."""
    vector, scores, keep = [], {}, {}
    keyed = key_layers(ctx, key)
    for layer in ctx.view.layers:
        s = stats[layer.index]
        kk = min(k, s["topk_logits"].shape[1])
        marker = topk_marker(s["topk_logits"][:, :kk], s["topk_ids"][:, :kk], layer.num_experts, r)
        if layer.index in keyed:
            vector += marker.tolist()
        scores[str(layer.index)] = [round(float(x), 6) for x in marker]
        keep[str(layer.index)] = select_top(marker, ctx.budget[layer.index], layer.groups)
    return vector, scores, keep


@planner("premoe_taer", kind="select", needs=("logits",), paper=PAPER, bounds={"k": (1, 16), "r": (-1.0, 1.0)},
         source="the released code (first-layer key, k=1); key=all: ours")
def premoe_taer(ctx, *, k: int = 1, r: float = -1.0, key: Literal["first", "all"] = "first"):
    """Per calibration task, store PreMoE's pattern; per query, retrieve the nearest and keep its experts.

    As the released code (JarvisPei/PreMoe: collect_utils.py ``build_logits_permutations``,
    partial_process.py ``collect_query_logits`` and ``load_permute_prune_experts``). Offline, for
    each calibration source (one per task, e.g. ``calib=testbed:domains`` or ``a+b``): per token
    take the top-K raw router logits z (K = ``k``, 1 as released) and keep those with
    softmax-over-top-K >= ``r`` (``r < 0`` keeps all K, the released default); the marker is the
    raw logit at kept positions and 0 elsewhere. TCESS_{l,e} = mean marker over the task's tokens.
    The task's index vector is TCESS of the first MoE layer (``key=first``, as released;
    ``key=all``, an option of ours, concatenates every MoE layer's); its kept set per layer is the
    top-n of TCESS_l (n = budget; the released code maps the first layer's ranks to each layer's
    ranking, which keeps the same experts). Online, the query's vector is computed the same way
    from the router logits of its context tokens; the nearest stored vector (L2, as faiss'
    IndexFlatL2) wins and its kept sets are used. Plan.keep is the union of the stored kept sets
    (experts any query can use; every expert of a group-limited layer where that union keeps
    unequal numbers per group).
    """
    domains = ctx.extra.get("domain_stats") or {"calib": ctx.stats}
    patterns = []
    for task, stats in domains.items():
        vector, scores, keep = task_pattern(ctx, stats, k=k, r=r, key=key)
        patterns.append({"task": task, "vector": vector, "scores": scores, "keep": keep})
    union = {layer.index: _usable(layer, {e for p in patterns for e in p["keep"][str(layer.index)]})
             for layer in ctx.view.layers}
    selector = {"name": "retrieval", "layers": [layer.index for layer in ctx.view.layers],
                "key_layers": key_layers(ctx, key), "k": k, "r": r, "patterns": patterns}
    return Plan("premoe_taer", "select", keep=union, selector=selector)


def _usable(layer, union: set[int]) -> list[int]:
    """The union of the kept sets, or every expert where routing groups would see unequal counts."""
    if layer.groups:
        size = layer.num_experts // layer.groups[0]
        if len({sum(1 for e in union if e // size == g) for g in range(layer.groups[0])}) > 1:
            return list(range(layer.num_experts))
    return sorted(union)
