"""One formula for routed-token expert scores, and the two gate-free criteria it gives: MAN and MSAN.

Liu et al. 2026, 'How to Score Experts for One-Shot MoE Expert Pruning: A Unified Formulation and
Selection Principle', arXiv 2606.15716, organise one-shot pruning criteria around three factors:
routing frequency, gate weighting and activation strength. moebench writes that family as

    s_e = N_e^a * (1 / N_e) * sum over x in X_e of g_e(x)^b * ||E_e(x)||_2^p

with X_e the tokens routed to expert e (the model's own top-k), N_e = |X_e|, g_e(x) the gate the
model applies, E_e(x) the expert's output, and three switches: ``a`` (1 keeps the routing
frequency, 0 averages over the routed tokens), ``b`` (1 weights by the gate, 0 is gate-free) and
``p`` (0, 1 or 2: no activation, its norm, its squared norm). The instances, in one table
(`INSTANCES`), each equal to the registered method's own score (tests/method/test_unified.py):

    frequency   a=1 b=0 p=0   N_e
    ean         a=1 b=0 p=1   sum of ||E_e(x)||
    reap        a=0 b=1 p=1   mean of g_e(x) ||E_e(x)||
    man         a=0 b=0 p=1   mean of ||E_e(x)||            (Mean Activation Norm)
    msan        a=0 b=0 p=2   mean of ||E_e(x)||^2          (Mean Squared Activation Norm)

SEER's soft counting (``soft_activation``) sums the router's probability over *all* tokens, not
the routed ones, so it lies outside this routed-token family and is not written as an instance.

The paper's principle: task-agnostic pruning should favour routed-token-averaged, gate-free
activation criteria (MAN, MSAN); task-specific pruning can keep frequency and gate.

What moebench follows: the authors' code is linked from the paper but could not be obtained here,
and only the paper's abstract was available, so the formula above, its exponents and the choice of
the model's own output E_e(x) (on Llama4, whose gate scales the expert's input, that is
f_e(g_e x)) are our reconstruction from the names and the abstract, labelled as ours. Experts
never routed to score 0 (averages over no tokens).
"""

from __future__ import annotations

import torch

from moebench.method.registry import score_method

PAPER = ("Liu et al. 2026, 'How to Score Experts for One-Shot MoE Expert Pruning: A Unified Formulation and "
         "Selection Principle', arXiv 2606.15716")
SOURCE = "reconstruction from the paper's abstract (code not obtainable): the formula's exponents and outputs are ours"

# name -> (a: keep frequency, b: gate weighting, p: power of the activation norm)
INSTANCES = {"frequency": (1, 0, 0), "ean": (1, 0, 1), "reap": (0, 1, 1), "man": (0, 0, 1), "msan": (0, 0, 2)}


def unified_score(stats: dict, frequency: int, gate: int, power: int) -> torch.Tensor:
    """``s_e`` of the module docstring from one layer's statistics (``routing`` and ``norms`` groups)."""
    if (gate, power) == (0, 0):
        total, count = stats["counts"].double(), stats["counts"].double()
    elif (gate, power) == (1, 0):
        total, count = stats["gate_sum"].double(), stats["counts"].double()
    else:
        sums = {(0, 1): "norm_sum", (0, 2): "norm_sq_sum", (1, 1): "gate_norm_sum"}
        if (gate, power) not in sums:
            raise ValueError(f"gate={gate}, power={power}: the statistics hold sum ||E||, sum ||E||^2 and "
                             "sum g ||E|| over routed tokens; choose power 1 or 2 without the gate, 1 with it")
        total, count = stats[sums[gate, power]].double(), stats["norm_count"].double()
    mean = total / count.clamp_min(1)
    return (mean * count if frequency else mean).float()


def _needs(params: dict) -> tuple[str, ...]:
    """Without an activation term the score reads the routing counts and gate sums."""
    return ("routing",) if params.get("power", 1) == 0 else ()


@score_method("man", needs=("norms",), paper=PAPER, source=SOURCE)
def man(ctx, layer):
    """Mean Activation Norm: s_e = (1 / N_e) sum over x in X_e of ||E_e(x)||_2 (gate-free, routed-token mean).

    The unified formula with a=0, b=0, p=1 (see `methods.unified`); our reconstruction from the
    paper's abstract.
    """
    return unified_score(ctx.stats[layer.index], *INSTANCES["man"])


@score_method("msan", needs=("norms",), paper=PAPER, source=SOURCE)
def msan(ctx, layer):
    """Mean Squared Activation Norm: s_e = (1 / N_e) sum over x in X_e of ||E_e(x)||_2^2.

    The unified formula with a=0, b=0, p=2 (see `methods.unified`); our reconstruction from the
    paper's abstract.
    """
    return unified_score(ctx.stats[layer.index], *INSTANCES["msan"])


@score_method("unified", needs=("norms",), extra_needs=_needs, paper=PAPER, source=SOURCE,
              bounds={"frequency": (0, 1), "gate": (0, 1), "power": (0, 2)})
def unified(ctx, layer, *, frequency: int = 0, gate: int = 0, power: int = 1):
    """s_e = N_e^frequency * (1 / N_e) sum over x in X_e of g_e(x)^gate * ||E_e(x)||_2^power.

    Any point of the unified formula (see `methods.unified`): frequency=1,gate=0,power=0 is
    frequency, 1,0,1 EAN, 0,1,1 REAP, 0,0,1 MAN (the default), 0,0,2 MSAN; also 1,1,0 (summed gate)
    and 1,1,1 / 1,0,2 (REAP-like and MSAN-like sums). gate=1 with power=2 has no statistic.
    """
    return unified_score(ctx.stats[layer.index], int(frequency), int(gate), int(power))
