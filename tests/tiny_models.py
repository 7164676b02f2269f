"""Tiny random models of every supported MoE family, built from configs (no downloads).

Hidden size 32, 2-3 decoder layers, 8 routed experts. Families with dense layers get one dense
first layer so that layer skipping is exercised; group-limited families use 2 groups.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "head_dim": 8,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
_MLA = {"kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "num_key_value_heads": 4}
_DENSE_FIRST = {"first_k_dense_replace": 1, "num_hidden_layers": 3, "n_shared_experts": 1, "moe_intermediate_size": 16}

FAMILY_CONFIGS: dict[str, dict] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
                  "mlp_only_layers": [0], "num_hidden_layers": 3},
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2},
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.5, **_MLA, **_DENSE_FIRST),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, **_MLA, **_DENSE_FIRST),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2, **_DENSE_FIRST),
    "gpt_oss": {"num_local_experts": 8, "num_experts_per_tok": 2,
                "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16},
    "phimoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3_next": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 32, "layer_types": ["linear_attention", "full_attention"],
                   "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
                   "linear_value_head_dim": 8},
    "ernie4_5_moe": {"moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 16, "moe_num_shared_experts": 1,
                     "moe_layer_start_index": 1, "num_hidden_layers": 3},
    "llama4_text": {"num_local_experts": 8, "num_experts_per_tok": 1, "intermediate_size_mlp": 64,
                    "interleave_moe_layer_step": 1, "no_rope_layers": [1, 1]},
}
FAMILIES = sorted(FAMILY_CONFIGS)


def tiny_config(model_type: str, **overrides):
    """A tiny transformers config of ``model_type``."""
    return AutoConfig.for_model(model_type, **{**COMMON, **FAMILY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random fp32 model of ``model_type`` in eval mode, with router/bias tensors randomised."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            # Zero-initialised routers / biases would hide routing bugs: give them random values.
            if tensor.is_floating_point() and ("gate.weight" in name or "router" in name or "bias" in name
                                               or name.endswith(("gate_up_proj", "down_proj"))):
                tensor.normal_(0, 0.5)
    return model


def sample_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, length]`` avoiding the special ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def observe_input(module, fn):
    """Forward pre-hook that calls ``fn(first input)`` and returns None (a returned value would replace the input)."""

    def hook(_module, args):
        fn(args[0])

    return module.register_forward_pre_hook(hook)
