"""Streaming prune to disk: write a pruned (or merged) checkpoint one decoder layer at a time.

`save_streaming(checkpoint, keep, out_dir, merge=None)` never holds more than one decoder layer
(or one non-layer tensor, such as the embeddings) in memory: for each decoder layer it reads
that layer's tensors from the source shards (`moebench.moe.layered`), applies the plan to that
layer only (merge groups, then the kept experts), converts the layer back to the checkpoint's
key names as ``save_pretrained`` does (transformers' reverse conversion; with uneven per-layer
counts the fused names, which only moebench loads, as `moebench.moe.checkpoint.save_pruned`),
and writes it as one shard; the other tensors are copied one at a time. A merge that keeps every router
row (``expert_map``, `moebench.moe.expert_map`) leaves the router whole and writes the merged experts once
(``layout="compact"``: fused names, the maps in config.json; moebench loads it) or each slot's merged
expert (``layout="duplicated"``: E experts, original names, a plain checkpoint). The index
(``model.safetensors.index.json``), ``config.json`` (the pruned model's, from the skeleton the
plan was applied to) and ``generation_config.json`` are written as transformers writes them.
"""

from __future__ import annotations

import os

import torch

from moebench.moe.files import ShardWriter
from moebench.moe.layered import LayeredCheckpoint, decoder_layers
from moebench.moe.merge import _merge_group
from moebench.moe.ops import _prune_layer
from moebench.moe.view import MoEView


def save_streaming(checkpoint: LayeredCheckpoint, keep: dict[int, list[int]], out_dir: str, config,
                   merge: dict | None = None, progress: bool = False, expert_map: dict | None = None,
                   layout: str = "compact") -> dict[str, int]:
    """Write the checkpoint pruned to ``keep`` (per MoE layer) into ``out_dir``, one layer at a time.

    ``config``: the pruned model's config (the skeleton's after the plan was applied). ``merge``:
    the plan's merge groups per layer (merged tensors are written into each group's ``into``
    expert before the others are dropped). ``expert_map``: the plan's maps (all router rows kept),
    written in ``layout`` (see the module docstring). Returns ``{"shards", "bytes"}``.
    """
    from tqdm.auto import tqdm
    from transformers.core_model_loading import revert_weight_conversion

    from moebench.moe.checkpoint import per_layer_counts
    from moebench.moe.expert_map import LAYOUTS, plain_config, slot_experts

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose compact or duplicated")
    maps = {int(k): list(v) for k, v in (expert_map or {}).items()}
    if maps and layout == "duplicated":  # a plain checkpoint: E experts, no map in its config
        config = plain_config(config)
    os.makedirs(out_dir, exist_ok=True)
    model = checkpoint.model
    view = MoEView(model)
    moe = {layer.index: layer for layer in view.layers}
    uniform = per_layer_counts(config) is None and (not maps or layout == "duplicated")
    n_layers = len(decoder_layers(model))
    n_shards = n_layers + len(checkpoint.other_keys)  # a shard per decoder layer and per other tensor
    shards = ShardWriter(out_dir, n_shards)

    for index in tqdm(range(n_layers), desc="writing pruned layers", unit="layer", disable=not progress):
        layer_module = checkpoint.materialise(index)
        try:
            if index in moe:
                with torch.no_grad():
                    for group in (merge or {}).get(index, []):
                        _merge_group(moe[index], group)
                    if index in maps:  # router whole; the merged experts once, or once per slot
                        ids = sorted(keep[index])
                        slot_experts(moe[index], ids if layout == "compact" else [ids[m] for m in maps[index]])
                    else:
                        _prune_layer(moe[index], list(keep.get(index, range(moe[index].num_experts))))
            tensors = layer_module.state_dict(prefix=checkpoint.layer_names[index] + ".")
            if uniform:  # the checkpoint's own key names, as save_pretrained writes them
                tensors = revert_weight_conversion(model, tensors)
            shards.write(dict(tensors), index)
        finally:
            checkpoint.release(layer_module)
            del layer_module
    for j, key in enumerate(checkpoint.other_keys):  # embeddings, norm, head: copied, in the model's dtype
        t = checkpoint.read([key])[key]
        shards.write({key: t.to(checkpoint.dtype) if t.is_floating_point() else t}, n_layers + j)
    written = shards.finish()
    config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(out_dir)
    return written
