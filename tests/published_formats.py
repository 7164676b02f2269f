"""Tiny random checkpoints written in the on-disk layouts the large MoEs are published in.

- `write_fp8_deepseek`: DeepSeek-V3 / R1 / Kimi-K2 style. Every linear layer of attention, the
  dense MLP, the shared and the routed experts is stored as ``weight`` in float8_e4m3fn plus
  ``weight_scale_inv`` (float32, one value per 128 x 128 block); routers, norms, embeddings and
  the head stay bf16; routed experts are stored per expert (``mlp.experts.<e>.gate_proj.weight``);
  ``quantization_config`` = {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
  weight_block_size: [128, 128]}. With ``mtp``, one multi-token-prediction layer is stored at
  ``model.layers.<num_hidden_layers>`` (``enorm``, ``hnorm``, ``eh_proj``, ``shared_head``, and a
  full MoE decoder layer), announced by ``num_nextn_predict_layers``.
- `write_mxfp4_gpt_oss`: GPT-OSS style. Routed experts stored fused as ``*_blocks`` (uint8
  ``[E, out, in/32, 16]``, two FP4 codes a byte) and ``*_scales`` (uint8 ``[E, out, in/32]``,
  exponent + 127) with bf16 ``*_bias``; ``quantization_config`` {quant_method: mxfp4, ...}.

Random values, valid codes: what the formats' readers see is exactly what they would see in a
published file. Hidden sizes are the smallest that give real blocks (256 for FP8, 128 x 128
blocks, one weight ending in a partial block as DeepSeek-V3's do; 64 for MXFP4, 32-value blocks).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

FP8_BLOCK = 128
FP8_MAX = 448.0


def fp8_deepseek_config(mtp: bool = True):
    """A DeepSeek-V3 config whose quantized linears are 128 x 128 blocks (first layer dense); like DeepSeek-V3's own
    ``kv_a_proj_with_mqa`` (576 = 4.5 x 128 rows) one weight ends in a partial block: 128 + 64 = 192 rows."""
    return AutoConfig.for_model(
        "deepseek_v3", vocab_size=96, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=None, kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        num_nextn_predict_layers=1 if mtp else 0, dtype="bfloat16")


def _quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 weight, weight_scale_inv)``: one scale per 128 x 128 block (the last blocks may be narrower)."""
    rows, cols = w.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    scale = torch.empty(br, bc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            block = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK].float()
            s = block.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            rows_, cols_ = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK)
            q[rows_, cols_] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


def _quantized(key: str, t: torch.Tensor) -> bool:
    """Which DeepSeek-V3 tensors are FP8 on disk: 2-D linear weights other than the router, embeddings, head."""
    return (t.ndim == 2 and key.endswith(".weight") and ".mlp.gate.weight" not in key and "embed" not in key
            and "lm_head" not in key and "shared_head.head" not in key and "norm" not in key)


def _random_state(model) -> dict[str, torch.Tensor]:
    """The model's checkpoint tensors (original per-expert key names), randomised where transformers inits zeros."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and (("gate" in name and "proj" not in name) or "bias" in name):
                t.normal_(0, 0.5)
            elif t.is_floating_point() and t.ndim >= 2:
                t.normal_(0, 0.05)
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {k: v.detach().clone() for k, v in model.state_dict().items()})


def _write(folder: str, tensors: dict[str, torch.Tensor], config: dict, per_shard: int = 40) -> None:
    """Write ``tensors`` as several shards plus the index, and ``config`` as config.json."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(tensors)
    chunks = [keys[i:i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map, total = {}, 0
    for n, chunk in enumerate(chunks):
        name = f"model-{n + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in chunk}, os.path.join(folder, name), metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = name
            total += tensors[k].numel() * tensors[k].element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def write_fp8_deepseek(folder: str, mtp: bool = True, fp8: bool = True) -> str:
    """A DeepSeek-V3-style FP8 checkpoint (per-expert keys, 128 x 128 block scales, optional MTP layer);
    ``fp8=False``: the same stored in bf16 (as the community's bf16 conversions, MTP layer included)."""
    config = fp8_deepseek_config(mtp)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    state = _random_state(model)
    n = config.num_hidden_layers
    if mtp:  # the MTP module: a copy of the last decoder layer's shapes with its own values, plus its projections
        torch.manual_seed(1)
        last = f"model.layers.{n - 1}."
        for key in [k for k in state if k.startswith(last)]:
            t = state[key]
            state[f"model.layers.{n}." + key[len(last):]] = (torch.randn_like(t, dtype=torch.float32)
                                                             * (0.5 if t.ndim < 2 else 0.05)).to(t.dtype)
        h = config.hidden_size
        state[f"model.layers.{n}.enorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        state[f"model.layers.{n}.hnorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        state[f"model.layers.{n}.eh_proj.weight"] = (torch.randn(h, 2 * h) * 0.05).to(torch.bfloat16)
        state[f"model.layers.{n}.shared_head.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        state[f"model.layers.{n}.shared_head.head.weight"] = state["lm_head.weight"].clone()
        state[f"model.layers.{n}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    tensors = {}
    for key, t in state.items():
        if fp8 and _quantized(key, t):
            tensors[key], tensors[key + "_scale_inv"] = _quantize_blocks(t)
        else:
            tensors[key] = t
    saved = config.to_dict()
    if fp8:
        saved["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    _write(folder, tensors, saved)
    return folder


def mxfp4_gpt_oss_config():
    """A GPT-OSS config whose expert widths are whole MXFP4 blocks (32 values)."""
    return AutoConfig.for_model(
        "gpt_oss", vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
        num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention"], sliding_window=16, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="bfloat16")


def write_mxfp4_gpt_oss(folder: str) -> str:
    """A GPT-OSS-style checkpoint with MXFP4 experts (``*_blocks`` / ``*_scales``) and bf16 everything else."""
    config = mxfp4_gpt_oss_config()
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    state = _random_state(model)
    g = torch.Generator().manual_seed(2)
    e, h, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
    tensors = {}
    for key, t in state.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows, cols = (2 * inter, h) if key.endswith("gate_up_proj") else (h, inter)  # [out, in] on disk
            tensors[key + "_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            tensors[key + "_scales"] = torch.randint(118, 124, (e, rows, cols // 32), generator=g, dtype=torch.uint8)
        else:
            tensors[key] = t
    saved = config.to_dict()
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    _write(folder, tensors, saved)
    return folder
