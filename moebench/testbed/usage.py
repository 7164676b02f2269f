"""Per-domain expert usage of a testbed model, and how specialised its experts are.

Routing is read from the model's own router logits (`output_router_logits=True`); for the
testbed families (Mixtral, Qwen2-MoE: softmax gates, no bias) the top-k of the logits is the
selection the model makes.
"""

from __future__ import annotations

import torch

from moebench.testbed.data import SEPARATOR, items
from moebench.testbed.domains import DOMAINS

SPECIALIST_SHARE = 0.5  # an expert is a specialist when one domain brings half its (normalised) traffic


@torch.no_grad()
def expert_usage(model, tok, n_items: int = 200, seed: int = 3, batch: int = 8) -> dict[str, torch.Tensor]:
    """Per domain, the share of top-k selections going to each expert: `[layers, experts]`, rows sum to 1."""
    k = model.config.num_experts_per_tok
    out = {}
    for domain in DOMAINS:
        texts = [it.text for it in items(domain, "eval", n_items, seed=seed)]
        counts = None
        for i in range(0, len(texts), batch):
            ids = tok(SEPARATOR.join(texts[i:i + batch]), return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids, output_router_logits=True).router_logits  # per layer [T, E]
            top = torch.stack([lg.topk(k, dim=-1).indices for lg in logits])  # [layers, T, k]
            hist = torch.stack([torch.bincount(t.flatten(), minlength=lg.shape[-1])
                                for t, lg in zip(top, logits, strict=True)]).double()  # [layers, experts]
            counts = hist if counts is None else counts + hist
        out[domain] = counts / counts.sum(dim=-1, keepdim=True)
    return out


def specialisation(usage: dict[str, torch.Tensor]) -> dict:
    """Summary of domain specialisation from `expert_usage`.

    Each expert's traffic is split between domains with every domain weighted equally:
    `p[d | layer, expert] = usage[d] / sum_d usage[d]`. Reported: the mean of `max_d p` over
    experts (1/6 would be no specialisation, 1 total), the share of experts whose top domain
    brings at least half their traffic, and those specialists per layer.
    """
    names = list(usage)
    stacked = torch.stack([usage[d] for d in names])  # [domains, layers, experts]
    p = stacked / stacked.sum(dim=0, keepdim=True).clamp_min(1e-12)
    top_share, top_domain = p.max(dim=0)  # [layers, experts]
    specialists = {}
    for layer in range(p.shape[1]):
        specialists[layer] = {int(e): (names[int(top_domain[layer, e])], round(float(top_share[layer, e]), 3))
                              for e in range(p.shape[2]) if top_share[layer, e] >= SPECIALIST_SHARE}
    return {
        "mean_top_domain_share": round(float(top_share.mean()), 4),
        "uniform_share": round(1 / len(names), 4),
        "specialist_fraction": round(float((top_share >= SPECIALIST_SHARE).double().mean()), 4),
        "specialists_per_layer": specialists,
    }


def usage_table(usage: dict[str, torch.Tensor], top: int = 2) -> list[str]:
    """Markdown rows: per domain and layer, its most used experts and their shares."""
    layers = next(iter(usage.values())).shape[0]
    rows = ["| domain | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
            "|---" * (layers + 1) + "|"]
    for domain, u in usage.items():
        cells = []
        for layer in range(layers):
            shares, experts = u[layer].topk(top)
            cells.append(", ".join(f"e{int(e)} {float(s):.0%}" for s, e in zip(shares, experts, strict=True)))
        rows.append(f"| {domain} | " + " | ".join(cells) + " |")
    return rows
