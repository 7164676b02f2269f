"""Recipes of the testbed models: a transformers config plus an optimisation schedule.

Kept free of heavy imports so that resolving a testbed name stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_COMMON = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 256, "tie_word_embeddings": True, "rope_theta": 10000.0,
           "output_router_logits": True, "router_aux_loss_coef": 0.02}


@dataclass(frozen=True)
class Recipe:
    """How one testbed model is built and trained."""

    name: str
    model_type: str
    arch: dict
    summary: str
    steps: int = 2400
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "testbed-8e": Recipe(
        name="testbed-8e", model_type="mixtral",
        arch=dict(_COMMON, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
        summary="Mixtral-style: 8 experts, top-2 (enumeration of kept sets is exact)",
    ),
    "testbed-32e": Recipe(
        name="testbed-32e", model_type="qwen2_moe",
        arch=dict(_COMMON, intermediate_size=256, moe_intermediate_size=64, num_experts=32,
                  num_experts_per_tok=4, shared_expert_intermediate_size=256, norm_topk_prob=False,
                  decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True),
        summary="Qwen2-MoE-style fine-grained: 32 routed experts, top-4, one shared expert",
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`, with a helpful error for unknown names."""
    if name not in RECIPES:
        raise ValueError(f"unknown testbed model {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]
