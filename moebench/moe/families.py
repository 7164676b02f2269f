"""Architecture facts of the MoE families that transformers 5 ships, as data.

One `Family` row per model family says where the MoE block sits in a decoder layer, what its
router, experts and shared experts are called, which config key holds the routed-expert count in
the family's own checkpoints, and how the router turns logits into gate values. Code elsewhere
reads these rows; it never branches on a family name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """How one MoE family lays out its experts and routes tokens.

    Attributes:
        name: a readable family name (``"Mixtral"``).
        model_types: transformers ``config.model_type`` values this row describes.
        block: attribute of a decoder layer that holds the MoE block (dense layers lack a router).
        router: attribute of the block that holds the router (``weight [E, H]``).
        experts: attribute of the block that holds the fused experts (every tensor ``[E, ...]``).
        shared: attributes of the block holding shared experts and their gates (never pruned).
        count_key: config key of the routed-expert count as the family's checkpoints spell it.
        router_tensors: ``(dotted name inside the router, expert dim)`` of every per-expert router
            tensor that may exist (router weight, bias, score-correction bias).
        correction_bias: dotted name of the score-correction bias inside the router, if any.
        scoring: how gate values are made: ``softmax`` (over all experts, then top-k),
            ``sigmoid`` (per expert), ``softmax_topk`` (softmax over the k largest logits),
            ``sigmoid_topk`` (sigmoid of the k largest logits), ``sparsemixer`` (PhiMoE).
        renormalise: ``True``/``False``, or the config key that decides (``norm_topk_prob``).
        group_keys: config keys ``(n_group, topk_group)`` of group-limited routing, if used.
        group_score_top: how many of a group's best scores rank the group (DeepSeek-V3 sums the
            top 2, DeepSeek-V2 takes the max); each group must keep at least this many experts.
        scaling_key: config key of a factor applied to gate values (``routed_scaling_factor``).
        router_output: ``"triple"`` for ``(logits, weights [T,k], indices [T,k])``;
            ``"dense_scores"`` for Llama4's ``(scores [T,E], logits)``.
        experts_slot: whether the experts module dispatches through transformers'
            experts-implementation slot (``set_experts_implementation``).
        gate_up_interleaved: whether ``gate_up_proj`` interleaves gate and up units along the
            intermediate axis (gate at even, up at odd positions) instead of gate then up halves;
            permuting an expert's intermediate units must follow it.
        gate_scales_input: whether the gate multiplies the expert's *input*, y_e = f_e(g_e x)
            (Llama4), instead of its output, y_e = g_e f_e(x) (every other family). Only
            meaningful with a gate that depends on the expert's own logit alone (no
            renormalisation over the chosen experts), so an expert's gated output on a token is
            the same whichever other experts are routable.
    """

    name: str
    model_types: tuple[str, ...]
    count_key: str
    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared: tuple[str, ...] = ()
    router_tensors: tuple[tuple[str, int], ...] = (("weight", 0), ("bias", 0), ("e_score_correction_bias", 0))
    correction_bias: str | None = None
    scoring: str = "softmax"
    renormalise: bool | str = "norm_topk_prob"
    group_keys: tuple[str, str] | None = None
    group_score_top: int = 1
    scaling_key: str | None = None
    router_output: str = "triple"
    experts_slot: bool = True
    gate_up_interleaved: bool = False
    gate_scales_input: bool = False
    notes: tuple[str, ...] = field(default=())


FAMILIES: tuple[Family, ...] = (
    Family("Mixtral", ("mixtral",), count_key="num_local_experts", renormalise=True),
    Family("Qwen2-MoE", ("qwen2_moe",), count_key="num_experts",
           shared=("shared_expert", "shared_expert_gate")),
    Family("Qwen3-MoE", ("qwen3_moe",), count_key="num_experts"),
    Family("Qwen3-Next", ("qwen3_next",), count_key="num_experts",
           shared=("shared_expert", "shared_expert_gate")),
    Family("OLMoE", ("olmoe",), count_key="num_experts"),
    Family("DeepSeek-V2", ("deepseek_v2",), count_key="n_routed_experts", shared=("shared_experts",),
           renormalise=False, group_keys=("n_group", "topk_group"), group_score_top=1,
           scaling_key="routed_scaling_factor",
           notes=("group-limited routing applies when topk_method='group_limited_greedy'",)),
    Family("DeepSeek-V3", ("deepseek_v3",), count_key="n_routed_experts", shared=("shared_experts",),
           correction_bias="e_score_correction_bias", scoring="sigmoid",
           group_keys=("n_group", "topk_group"), group_score_top=2, scaling_key="routed_scaling_factor"),
    Family("GLM4-MoE", ("glm4_moe",), count_key="n_routed_experts", shared=("shared_experts",),
           correction_bias="e_score_correction_bias", scoring="sigmoid",
           group_keys=("n_group", "topk_group"), group_score_top=2, scaling_key="routed_scaling_factor"),
    Family("GPT-OSS", ("gpt_oss",), count_key="num_local_experts", router="router",
           scoring="softmax_topk", renormalise=False, gate_up_interleaved=True,
           notes=("experts stored transposed with gate/up interleaved and biases",)),
    Family("PhiMoE", ("phimoe",), count_key="num_local_experts", router="router",
           scoring="sparsemixer", renormalise=False),
    Family("Ernie4.5-MoE", ("ernie4_5_moe",), count_key="moe_num_experts", shared=("shared_experts",),
           router_tensors=(("weight", 0), ("moe_statics.e_score_correction_bias", 1)),
           correction_bias="moe_statics.e_score_correction_bias", renormalise=True),
    Family("Llama4", ("llama4_text",), count_key="num_local_experts", block="feed_forward",
           router="router", shared=("shared_expert",), scoring="sigmoid_topk", renormalise=False,
           router_output="dense_scores", experts_slot=False, gate_scales_input=True,
           notes=("experts run densely on every token; the gate scales each expert's input "
                  "(no experts slot)",)),
)

# The score function a family applies to every logit, dense over all experts: what "the router's
# probability of expert e" means there (soft counting, expected contributions).
_DENSE_SCORE = {"softmax": "softmax", "softmax_topk": "softmax", "sparsemixer": "softmax",
                "sigmoid": "sigmoid", "sigmoid_topk": "sigmoid"}


def dense_score_function(family: Family) -> str:
    """``"softmax"`` or ``"sigmoid"``: the family's score function applied to all logits at once."""
    return _DENSE_SCORE[family.scoring]


_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def family_for(model_type: str) -> Family | None:
    """The `Family` row for a transformers ``config.model_type``, or None if unknown."""
    return _BY_MODEL_TYPE.get(model_type)


def supported_model_types() -> list[str]:
    """All ``model_type`` values with a row in the table, sorted."""
    return sorted(_BY_MODEL_TYPE)
