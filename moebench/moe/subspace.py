"""Subspace merging (Sub-MoE): a joint SVD of a group's expert weights, one shared U, merged V blocks.

For each of an expert's three projections, held as a linear map's ``[out, in]`` weight (gate ``[I, H]``,
up ``[I, H]``, down ``[H, I]``, whatever the family's storage: fused, transposed, interleaved), the n members
of a group, ordered with the ``into`` expert first and the others by id (the order of the REAP authors'
merger), are concatenated along the input axis and decomposed:

    [W_1, ..., W_n] = U diag(S) Vh,   U [out, K], S [K], Vh [K, n*in],   K = min(out, n*in)

(truncated to the top ``rank`` singular values when ``rank`` > 0). Vh is cut into n blocks ``[K, in]``, the
merged expert is ``U diag(S) sum_i w_i V_i`` with the group's weights w (they sum to one). How Vh is cut:

- ``split="reshape"`` (the REAP authors' code, ``merge.py`` ``submoe``): Vh's memory read row-major as
  ``[n, K, in]``, so block i holds rows i*K/n .. (i+1)*K/n of Vh, each cut into n pieces of ``in`` columns;
  this is not member i's columns. The result also depends on the SVD's sign convention (a singular vector
  pairs with pieces of other rows of Vh); moebench calls `torch.linalg.svd` as they do.
- ``split="columns"`` (the paper): block i = Vh[:, i*in:(i+1)*in], member i's own coordinates, so that
  W_i = U diag(S) V_i; untruncated, the merge is exactly sum_i w_i W_i (frequency-weighted averaging).

Biases (GPT-OSS) are vectors and are averaged with the same weights (ours: the authors' merger never reads
them). The merged expert is stored dense, in the ``into`` slot, like every moebench merge.
"""

from __future__ import annotations

import torch

from moebench.moe.kernels import is_transposed
from moebench.moe.view import MoEError, MoELayer

SPLITS = ("reshape", "columns")
_KNOWN = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def linear_weights(layer: MoELayer, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s gate ``[I, H]``, up ``[I, H]`` and down ``[H, I]`` weights in linear-map orientation (views)."""
    tensors = layer.expert_tensors()
    unknown = sorted(set(tensors) - set(_KNOWN))
    if unknown or "gate_up_proj" not in tensors:
        raise MoEError(f"layer {layer.index}: expert tensors {sorted(tensors)} are not gate_up_proj / down_proj; "
                       "subspace merging needs gated experts")
    gate_up, down = tensors["gate_up_proj"][e], tensors["down_proj"][e]
    if is_transposed(layer.experts):
        gate_up, down = gate_up.T, down.T
    if layer.family.gate_up_interleaved:
        gate, up = gate_up[0::2], gate_up[1::2]
    else:
        gate, up = gate_up.chunk(2, dim=0)
    return {"gate": gate, "up": up, "down": down}


def full_ranks(layer: MoELayer, n: int) -> dict[str, int]:
    """K = min(out, n*in) of each projection for a group of ``n`` experts (shapes only)."""
    w = linear_weights(layer, 0)
    return {name: min(t.shape[0], n * t.shape[1]) for name, t in w.items()}


def subspace_merge(mats: list[torch.Tensor], weights: torch.Tensor, split: str = "reshape",
                   rank: int = 0) -> torch.Tensor:
    """``[out, in]``: U diag(S) sum_i w_i V_i of the joint SVD of ``mats`` (n of ``[out, in]``), float64."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    n, cols = len(mats), mats[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat([m.double() for m in mats], dim=1), full_matrices=False)
    if rank > 0:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    k = vh.shape[0]
    blocks = vh.reshape(n, k, cols) if split == "reshape" else vh.reshape(k, n, cols).transpose(0, 1)
    w = torch.as_tensor(weights, dtype=torch.float64, device=vh.device)
    return (u * s) @ (w[:, None, None] * blocks).sum(0)


def merge_group(layer: MoELayer, g: dict) -> None:
    """Write group ``g``'s subspace merge (``g["svd"]``: split, rank) into its ``into`` expert, in place."""
    into, svd = g["into"], g["svd"]
    order = [into] + [e for e in g["experts"] if e != into]
    weight = dict(zip(g["experts"], g["weights"], strict=True))
    w = torch.tensor([weight[e] for e in order], dtype=torch.float64)
    with torch.no_grad():
        members = [linear_weights(layer, e) for e in order]
        merged = {name: subspace_merge([m[name] for m in members], w, svd["split"], svd["rank"])
                  for name in ("gate", "up", "down")}
        target = linear_weights(layer, into)  # views into the fused tensors
        for name, value in merged.items():
            target[name].copy_(value.to(target[name].dtype))
        tensors = layer.expert_tensors()
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            if name in tensors:
                t = tensors[name].data
                t[into] = sum(weight[e] * t[e].double() for e in order).to(t.dtype)
