"""PREP: input-aware expert selection from expansion points with first-order importance prediction.

Zhang et al., 'PREP', Frontiers of Computer Science 2026. Only the abstract is public: offline,
expert importance at expansion points with a first-order model of how importance moves with the
input; online, a fast CPU search for the nearest point, predicted importance, an adaptive per-layer
budget and layer-by-layer loading. The algorithm below is our implementation of that description.
"""

from __future__ import annotations

import torch

from moebench.method.plan import Plan
from moebench.method.registry import planner

PAPER = "Zhang et al., 'PREP', Frontiers of Computer Science 2026 (abstract only; algorithm as implemented)"


def prompt_features(ctx, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per calibration window: mean router logits ``[P, L, E]`` and expert importance ``[P, L, E]``.

    Importance of expert e on token x: p_e(x) * ||y_e(x)||, its expected contribution, with p the
    family's own score function of the logits (softmax; sigmoid for sigmoid routers) and y_e every
    expert's output on the ``outputs`` subsample (where the gate scales the input, y_e = f_e(g_e x)
    already holds it and the importance is ||y_e||); averaged over the window's tokens.
    """
    first = stats[ctx.view.layers[0].index]["outputs_sample_ids"]
    windows = torch.unique(first)
    feats, imps = [], []
    for layer in ctx.view.layers:
        s = stats[layer.index]
        logits, sid = s["logits"].double(), s["outputs_sample_ids"]
        weight = layer.output_weights(layer.dense_scores(logits)).double()
        contrib = weight * s["all_outputs"].double().norm(dim=-1)  # [n, E]
        feats.append(torch.stack([logits[sid == w].mean(0) for w in windows]))
        imps.append(torch.stack([contrib[sid == w].mean(0) for w in windows]))
    return torch.stack(feats, 1), torch.stack(imps, 1)


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Centers ``[k, D]`` and assignments ``[N]`` of ``x [N, D]`` (seeded k-means++ start, Lloyd steps)."""
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g)]
    while len(centers) < k:
        d = torch.cdist(x, centers).min(1).values ** 2
        centers = torch.cat([centers, x[torch.multinomial(d + 1e-12, 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        centers = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centers[j] for j in range(k)])
    return centers, torch.cdist(x, centers).argmin(1)


@planner("prep", kind="select", needs=("outputs",), paper=PAPER, bounds={"points": (1, 4096), "ridge": (0.0, 1e6)},
         source="our reconstruction from the abstract (no code)")
def prep(ctx, *, points: int = 8, ridge: float = 1.0):
    """Expansion points over calibration windows; online first-order importance and adaptive budgets.

    Offline (calibration windows of every source, e.g. ``calib=testbed:domains``, are the prompts):
    a prompt's input coordinate z_l [E] is its mean router logits in layer l (the router's linear
    projection of the input: the part of the input routing sees); its importance I_l [E] is the mean
    of p_e(z) * ||y_e(x)|| over its tokens (p: the family's score function, see `prompt_features`).
    k-means (``points`` clusters) on the concatenated z gives the expansion points c_j with
    importance I_j = the members' mean. The first-order term is a per-layer Jacobian J_l [E, E]
    fitted by ridge regression (``ridge``) of the members' deviations (I - I_j) on (z - c_j) over
    all prompts: a linear approximation of d I / d z.

    Online (CPU, microseconds): nearest expansion point j (L2 on z of the context), predicted
    importance I_j + J_l (z_l - c_{j,l}); per-layer budgets: every layer keeps >= top_k, the remaining
    slots of the total budget (sum of the uniform per-layer budget: the requested ratio, met for every
    input) go to the largest importance shares across layers (`moebench.method.select.allocate`).
    """
    domains = ctx.extra.get("domain_stats") or {"calib": ctx.stats}
    parts = [prompt_features(ctx, stats) for stats in domains.values()]
    z, imp = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # [P, L, E]
    n_prompts, n_layers, n_exp = z.shape
    centers, assign = kmeans(z.reshape(n_prompts, -1), min(points, n_prompts), ctx.seed)
    centers = centers.view(-1, n_layers, n_exp)
    point_imp = torch.stack([imp[assign == j].mean(0) if (assign == j).any() else imp.mean(0)
                             for j in range(len(centers))])
    dz, di = z - centers[assign], imp - point_imp[assign]  # [P, L, E]
    eye = torch.eye(n_exp, dtype=torch.float64)
    jac = torch.stack([torch.linalg.solve(dz[:, li].T @ dz[:, li] + ridge * eye, dz[:, li].T @ di[:, li]).T
                       for li in range(n_layers)])  # [L, E, E]: d I / d z
    layers = ctx.view.layers
    selector = {"name": "predictive", "layers": [layer.index for layer in layers],
                "top_k": {str(layer.index): layer.top_k for layer in layers},
                "budget": {str(layer.index): ctx.budget[layer.index] for layer in layers},
                "groups": {str(layer.index): list(layer.groups) if layer.groups else None for layer in layers},
                "centers": centers.reshape(len(centers), -1).tolist(), "importance": point_imp.tolist(),
                "jacobian": jac.tolist(), "prompts": n_prompts}
    keep = {layer.index: list(range(layer.num_experts)) for layer in layers}  # any expert may be selected
    return Plan("prep", "select", keep=keep, selector=selector)
