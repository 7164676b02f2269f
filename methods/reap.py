"""REAP: router-weighted expert activation pruning (Lasby et al., ICLR 2026)."""

from __future__ import annotations

from moebench.method.registry import score_method


@score_method("reap", needs=("norms",),
              paper="Lasby et al. 2026, 'REAP: Router-weighted Expert Activation Pruning', ICLR 2026")
def reap(ctx, layer):
    """s_e = (1 / |X_e|) * sum over x in X_e of g_e(x) * ||E_e(x)||_2, X_e = tokens routed to e.

    g_e(x) is the gate value the model really applies (after its own softmax / sigmoid,
    renormalisation, bias and scaling), read from the router's output. Experts never routed
    to score 0.
    """
    s = ctx.stats[layer.index]
    return s["gate_norm_sum"] / s["norm_count"].clamp_min(1)
