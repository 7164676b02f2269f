"""Which writer saves a pruned checkpoint: sliced from the source's own tensors, streamed layer by layer, or
from the model in memory (`moebench prune` and the grid's vLLM cells both choose here)."""

from __future__ import annotations

from moebench.moe.checkpoint import save_pruned
from moebench.moe.formats import has_safetensors, save_sliced
from moebench.moe.layered import LayeredCheckpoint
from moebench.moe.streaming import save_streaming
from moebench.util import on_terminal


def checkpoint_writer(model, layered, source: str, source_config: dict, plan, experts_before: dict, record: dict | None,
                      save_dtype, out: str, weights_changed: bool = False, layout: str = "compact"):
    """``writer(folder)`` for the pruned checkpoint: a plan that removes experts with one budget for every layer
    is written from the source's own tensors, in its format (`moebench.moe.formats.save_sliced`); merged experts
    (new weights) and per-layer counts (moebench's fused layout) from the model as planned: shard by shard from
    the source (a layer-by-layer skeleton) or from memory, dequantized / cast to ``save_dtype`` if given.
    ``weights_changed``: the model's weights differ from the source's (a recovery stage trained them), so the
    checkpoint is written from memory. ``layout``: how a merge that keeps every router row is written, compact
    (moebench loads it) or duplicated (a plain checkpoint; `moebench.moe.checkpoint.save_pruned`)."""
    uniform = len(set(plan.experts_kept().values())) == 1
    novice = getattr(plan, "novice", None)  # MoNE: router rows kept, constants beside: from memory only
    if novice and layered is not None:
        raise ValueError(f"{plan.method}: a checkpoint with novice experts is written from the model in memory; "
                         "layer by layer (--sequential) cannot write it: use --no-sequential where the model fits")
    if not weights_changed and not plan.merge and not novice and uniform and has_safetensors(source):
        return lambda d: save_sliced(source, model, plan.keep, experts_before, d, record=record,
                                     save_dtype=save_dtype, progress=on_terminal())
    if layered is not None:  # shard by shard from the source checkpoint: the model is never loaded whole
        reader = LayeredCheckpoint(layered.path, dtype=save_dtype or layered.dtype, device="cpu")
        return lambda d: save_streaming(reader, plan.keep, d, model.config, merge=plan.merge, progress=on_terminal(),
                                        expert_map=getattr(plan, "expert_map", None), layout=layout)
    if save_dtype is not None:
        model.to(save_dtype)
    return lambda d: save_pruned(model, d, shown_as=out, layout=layout)
