"""PreMoE task-adaptive expert retrieval (TAER), following PreMoE v1 (arXiv 2505.17639v1).

Pei et al., 'PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval'
(v1: Probabilistic Expert Pruning with TCESS + Task-Adaptive Expert Retrieval). We follow v1;
v3 (PEU, 'Proactive Inference') changes the score, not the retrieval.
"""

from __future__ import annotations

from moebench.method.plan import Plan
from moebench.method.registry import planner, select_top
from moebench.method.select import topk_marker

PAPER = ("Pei et al., 'PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval', "
         "arXiv 2505.17639 v1 (TCESS + TAER)")


def task_pattern(ctx, stats: dict, *, k: int, r: float) -> tuple[list[float], dict, dict]:
    """One task's pattern: index vector [L*E], per-layer TCESS scores [E] and kept ids."""
    vector, scores, keep = [], {}, {}
    for layer in ctx.view.layers:
        s = stats[layer.index]
        kk = min(k if k > 0 else layer.top_k, s["topk_logits"].shape[1])
        marker = topk_marker(s["topk_logits"][:, :kk], s["topk_ids"][:, :kk], layer.num_experts, r)
        vector += marker.tolist()
        scores[str(layer.index)] = [round(float(x), 6) for x in marker]
        keep[str(layer.index)] = select_top(marker, ctx.budget[layer.index], layer.groups)
    return vector, scores, keep


@planner("premoe_taer", kind="select", needs=("logits",), paper=PAPER, bounds={"r": (-1.0, 1.0)})
def premoe_taer(ctx, *, k: int = 0, r: float = -1.0):
    """Per calibration task, store PreMoE's pattern; per query, retrieve the nearest and keep its experts.

    Offline, for each calibration source (one per task, e.g. ``calib=testbed:domains`` or ``a+b``):
    per token take the top-K router logits z (K = ``k``, default the model's top_k) and keep those
    with softmax-over-top-K >= ``r`` (``r < 0`` keeps all K, the released code's default); the
    marker is the raw logit at kept positions and 0 elsewhere. TCESS_{l,e} = mean marker over the
    task's tokens. The task's index vector is the concatenation of TCESS_l over MoE layers; its kept
    set per layer is the top-n of TCESS_l (n = budget). Online, the query's vector is computed the
    same way from the router logits of its context tokens; the nearest stored vector (L2) wins and
    its kept sets are used. Plan.keep is the union of the stored kept sets (experts any query can use).
    """
    domains = ctx.extra.get("domain_stats") or {"calib": ctx.stats}
    patterns = []
    for task, stats in domains.items():
        vector, scores, keep = task_pattern(ctx, stats, k=k, r=r)
        patterns.append({"task": task, "vector": vector, "scores": scores, "keep": keep})
    union = {layer.index: sorted({e for p in patterns for e in p["keep"][str(layer.index)]})
             for layer in ctx.view.layers}
    selector = {"name": "retrieval", "layers": [layer.index for layer in ctx.view.layers],
                "k": max(k, 0) or ctx.view.top_k, "r": r, "patterns": patterns}
    return Plan("premoe_taer", "select", keep=union, selector=selector)
