"""Sequential calibration: the statistics of `moebench.calib.stats.collect`, one decoder layer at a time.

For a model larger than the device (or than memory), `collect_sequential` never holds more than
one decoder layer's weights: the model is a meta-device skeleton (`moebench.moe.layered`); the
calibration batches are embedded by the model's own forward (which also yields each layer's
attention mask and rotary position embeddings), then for every decoder layer in order its
weights are read from the safetensors shards, every batch's hidden states run through it with
the same observers as the one-forward pass (router hook, kernel observer or block hook), its
statistics are handed to ``on_layer`` (which writes them to the cache), its outputs become the
next layer's inputs (kept on the CPU, one tensor per batch), and its weights are freed.

The batches and their order are those of the one-forward pass, so the statistics are the same
(within float32 round-off of the layer-level calls). Memory: one layer's weights, the hidden
states of the calibration set (S x L x H in the model's dtype, on the CPU), and one layer's
statistics (its ``outputs`` subsample, ``[n, E, H]`` float32, until ``on_layer`` has written it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from moebench.calib.stats import GROUPS, CollectSettings, _block_observer, _LayerAccumulator, subsample
from moebench.moe.kernels import observing, use_moebench_kernel
from moebench.moe.layered import LayeredCheckpoint, decoder_layers, to_device
from moebench.moe.view import MoEView
from moebench.util import on_terminal


def collect_sequential(checkpoint: LayeredCheckpoint, tokens: torch.Tensor, groups,
                       settings: CollectSettings | None = None, progress: bool = True,
                       on_layer: Callable[[int, dict], dict] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """``collect``'s statistics of ``tokens [S, L]``, computed one decoder layer at a time.

    ``on_layer(index, stats)`` receives each MoE layer's statistics as soon as they are complete
    and returns what to keep in memory of them (the cache writes the ``outputs`` group to a file of
    its own and keeps nothing of it); default: keep everything.
    """
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown statistic groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    settings = settings or CollectSettings()
    model = checkpoint.model
    view = MoEView(model)
    moe = {layer.index: layer for layer in view.layers}
    total = tokens.numel()
    chosen = subsample(total, settings.subsample_tokens, settings.seed)
    ratio_chosen = subsample(total, settings.ratio_samples, settings.seed)
    layers = decoder_layers(model)
    bar = progress and on_terminal()
    began = time.perf_counter()
    if progress and not bar:
        print(f"sequential calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens, {len(layers)} decoder "
              f"layers one at a time, groups {', '.join(sorted(groups))} ...", file=sys.stderr, flush=True)
    with torch.no_grad():
        hidden, kwargs = checkpoint.layer_inputs(tokens, settings.batch_size)
    result = {}
    for index in tqdm(range(len(layers)), desc="sequential calibration", unit="layer", disable=not bar):
        layer_module = checkpoint.materialise(index)
        acc = None
        if index in moe:
            acc = _LayerAccumulator(moe[index], groups, settings, chosen, tokens.shape[1], ratio_chosen=ratio_chosen)
        try:
            run_layer(checkpoint, layer_module, hidden, kwargs[index], acc)
        finally:
            checkpoint.release(layer_module)
        kwargs[index] = None  # this layer's masks and position embeddings are not needed again
        if acc is not None:
            stats = acc.result()
            result[index] = on_layer(index, stats) if on_layer else stats
    if progress and not bar:
        print(f"sequential calibration: done in {time.perf_counter() - began:.1f}s", file=sys.stderr, flush=True)
    return result


def run_layer(checkpoint: LayeredCheckpoint, layer_module, hidden: list, kwargs: list, acc=None,
              kernel: bool = True) -> None:
    """Run every batch's hidden states through one materialised decoder layer, in place (``hidden[b]``
    becomes the layer's output, on the CPU); ``acc``: the layer's statistics accumulator (None: no
    observation). ``kernel``: moebench's experts kernel (needed to observe); False keeps the model's own."""
    model, device = checkpoint.model, checkpoint.device
    hooks, slot = [], []
    if acc is not None:
        hooks.append(acc.layer.router.register_forward_hook(acc.router_seen))
        if acc.layer.family.experts_slot:
            slot = [acc]
        else:
            hooks.append(acc.layer.block.register_forward_pre_hook(_block_observer(acc)))
    try:
        with torch.no_grad(), (use_moebench_kernel(model) if kernel else nullcontext()), \
                observing([a.layer.experts for a in slot], slot):
            for b, h in enumerate(hidden):
                out = layer_module(h.to(device), **to_device(kwargs[b], device))
                hidden[b] = (out[0] if isinstance(out, tuple) else out).to("cpu")
    finally:
        for hook in hooks:
            hook.remove()
