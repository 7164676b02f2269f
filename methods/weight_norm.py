"""A data-free baseline: expert weight magnitude (no calibration data)."""

from __future__ import annotations

import torch

from moebench.method.registry import score_method


@score_method("weight_norm", paper="data-free weight-magnitude baseline (moebench; in the spirit of "
                                   "magnitude pruning, Han et al. 2015, applied per expert)",
              source="moebench's own data-free baseline", reads_weights=True)
def weight_norm(ctx, layer):
    """s_e = ||W_gate_up,e||_F * ||W_down,e||_F: experts with small weights change the output least.

    Needs no calibration statistics. The product bounds the expert's output scale for unit
    inputs up to the activation's Lipschitz constant; it is our choice of a data-free score.
    """
    tensors = layer.expert_tensors()
    up = tensors["gate_up_proj"].detach().float().flatten(1).norm(dim=1)
    down = tensors["down_proj"].detach().float().flatten(1).norm(dim=1)
    return (up * down).to(torch.float64)
