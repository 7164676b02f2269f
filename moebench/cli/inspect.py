"""`moebench inspect MODEL`: the MoE structure of a model, read from its config alone.

The model is built on the meta device, so even a 100B-parameter hub model is inspected from its
config.json without downloading weights.
"""

from __future__ import annotations

import argparse
import os

from tabulate import tabulate

from moebench.moe.checkpoint import checkpoint_bytes, load_structure, resolve
from moebench.moe.formats import format_name, mtp_indices, mtp_layers, quantization
from moebench.moe.view import MoEView


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench inspect`."""
    parser.add_argument("model", help="hub id, local folder or testbed model name")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the hub repo's own code")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def summary(view: MoEView) -> list[tuple[str, str]]:
    """Rows (field, value) describing the MoE structure of a model."""
    layers = view.layers
    counts = sorted(set(view.experts_per_layer.values()))
    n_layers = len(view.model.model.layers) if hasattr(view.model, "model") else len(layers)
    dense = sorted(set(range(n_layers)) - set(view.indices))
    shared = layers[0].shared_experts
    expert, total = view.expert_bytes(), view.total_bytes()
    return [
        ("family", f"{view.family.name} (model_type {view.model_type})"),
        ("MoE layers", f"{len(layers)} of {n_layers}: {_ranges(view.indices)}"),
        ("dense layers", _ranges(dense) if dense else "none"),
        ("routed experts", ", ".join(map(str, counts)) + (" (per layer differs)" if len(counts) > 1 else " per layer")),
        ("top_k", str(view.top_k)),
        ("router", layers[0].describe()),
        ("shared experts", ", ".join(shared) if shared else "none"),
        ("expert layout", _layout(layers[0])),
        ("expert bytes", f"{_gb(expert)} of {_gb(total)} total ({100 * expert / total:.1f}%), in memory in "
                         f"{str(next(iter(layers[0].expert_tensors().values())).dtype).removeprefix('torch.')}"),
    ]


def _layout(layer) -> str:
    """Shapes of the fused expert tensors, e.g. ``gate_up_proj [8, 128, 32], down_proj [8, 32, 64]``."""
    return ", ".join(f"{name} {list(t.shape)}" for name, t in layer.expert_tensors().items())


def _ranges(ids: list[int]) -> str:
    """``[0,1,2,5]`` -> ``"0-2, 5"``."""
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def disk_rows(model_name: str, config, revision: str | None, in_memory: int) -> list[tuple[str, str]]:
    """Rows on the checkpoint as stored: its format (FP8 blocks, MXFP4, bf16, ...), MTP layers, bytes on disk."""
    path = resolve(model_name)
    local = os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))
    rows = [("format on disk", format_name(config, path if local else None)
             + ("" if local or quantization(config) else " (as config.json declares; weights not read)"))]
    if quantization(config):
        rows[0] = (rows[0][0], rows[0][1] + "; dequantized to bf16 where the device cannot run it (a CPU); a pruned "
                   "checkpoint is written in this format unless --save-dtype says otherwise")
    mtp = len(mtp_indices(config, path)) if local else mtp_layers(config)
    if mtp:
        rows.append(("MTP layers", f"{mtp}{'' if local else ' declared'} (model.layers.{config.num_hidden_layers}...; "
                                   "not run by transformers; pruned with the last MoE layer's kept ids)"))
    size = checkpoint_bytes(model_name, revision)
    if size:
        growth = in_memory / size
        rows.append(("checkpoint bytes", f"{_gb(size)} on disk" + (f"; {_gb(in_memory)} in memory as built here "
                                                                    f"({growth:.2f}x)" if abs(growth - 1) > 0.05
                                                                    else "")))
    return rows


def run(args: argparse.Namespace) -> int:
    """Print the MoE structure of ``args.model``."""
    kwargs = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}
    view = MoEView(load_structure(args.model, **{k: v for k, v in kwargs.items() if v}))
    print(f"moebench inspect {args.model}")
    rows = summary(view) + disk_rows(args.model, view.model.config, args.revision, view.total_bytes())
    print(tabulate(rows, tablefmt="plain"))
    return 0
