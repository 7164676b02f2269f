"""Novice experts (MoNE): replaced experts answer with a constant vector; the router is left as it is.

A *novice set* maps an MoE decoder-layer index to ``{"experts": [router ids replaced],
"vectors": [n, H] float32}`` (row j is the constant of ``experts[j]``). `attach_novices` puts it in
effect:

- ``physical=True``: the replaced experts' tensors are removed from the experts module (memory falls
  as with pruning), the router keeps all E rows, so every token is routed as before; a token routed
  to a replaced expert e receives g_e(x) * v_e, its gate times e's constant, and no expert runs for
  that pair. This happens in moebench's experts kernel (`moebench.moe.kernels.NOVICE_ATTR`, the slot
  skipping and offloading use): router ids are mapped to the physical experts, novice pairs are made
  inactive, and their constants are summed as a ``[T, n] x [n, H]`` product of gates and vectors.
- ``physical=False`` (``apply=mask``): the same outputs with every expert kept in memory.

The vectors are kept in float32 on the CPU and copied once per device and dtype they are used in;
they are added in the model's dtype. Families whose experts run outside transformers'
experts-implementation slot (Llama4, whose gate also scales the expert's input, so there is no
output gate to scale a constant with) are refused.

A checkpoint with novices (`save_novices`, read back by `moebench.moe.checkpoint.load_model`): the
config keeps the router's expert count E and gains ``moebench_novices = {"file": "novices.safetensors",
"layers": {layer: [replaced ids]}}``; the expert tensors hold the kept experts (moebench's fused
layout); ``novices.safetensors`` holds ``layers.<i>.experts`` (int64 ``[n]``) and ``layers.<i>.vectors``
(float32 ``[n, H]``). Plain transformers cannot apply the constants and refuses the checkpoint (its
expert tensors do not match the config's count).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from moebench.moe.kernels import NOVICE_ATTR, switch_to_kernel
from moebench.moe.ops import is_masked, slot_experts
from moebench.moe.view import MoEError, MoEView

NOVICE_FILE = "novices.safetensors"
CONFIG_KEY = "moebench_novices"


class NoviceCheckpointWarning(UserWarning):
    """Saved a checkpoint with novice experts, which only moebench's loader can apply."""


class Novices:
    """One layer's novices, attached to its experts module: router id -> physical expert or constant.

    Attributes:
        n_router: the router's expert count E (unchanged).
        replaced: router ids answered by a constant; ``vectors [n, H]`` float32, row j for ``replaced[j]``.
        physical: experts the module holds (E minus the replaced ones, or E with ``physical=False``).
    """

    def __init__(self, n_router: int, replaced: list[int], vectors: torch.Tensor, physical: bool = True):
        self.n_router, self.replaced = int(n_router), sorted(int(e) for e in replaced)
        gone = set(self.replaced)
        kept = [e for e in range(self.n_router) if e not in gone]
        self.slot = torch.full((self.n_router,), -1, dtype=torch.long)
        self.slot[kept] = torch.arange(len(kept)) if physical else torch.tensor(kept, dtype=torch.long)
        self.row = torch.full((self.n_router,), -1, dtype=torch.long)
        self.row[self.replaced] = torch.arange(len(self.replaced))
        self.physical = len(kept) if physical else self.n_router
        self.vectors = vectors.detach().to("cpu", torch.float32).contiguous()
        self._placed: dict[tuple[str, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(slot, row, vectors in dtype)`` on ``device`` (copied once per device and dtype)."""
        key = (str(device), dtype)
        if key not in self._placed:
            self._placed[key] = (self.slot.to(device), self.row.to(device), self.vectors.to(device, dtype))
        return self._placed[key]

    def split(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, active: torch.Tensor | None):
        """``(physical ids [T, k], active [T, k], constants [T, H])`` for router ids ``index [T, k]``.

        Novice pairs become inactive (the kernel never computes them); ``constants[t]`` is the sum over
        t's active novice pairs of gate x vector, in ``hidden``'s dtype. No host synchronisation.
        """
        slot, row, vectors = self._on(hidden.device, hidden.dtype)
        mapped = slot[index]
        novice = mapped < 0
        live = novice if active is None else novice & active
        gates = torch.where(live, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
        mix = torch.zeros(hidden.shape[0], len(self.replaced), dtype=hidden.dtype, device=hidden.device)
        mix.scatter_add_(1, row[index].clamp_min(0), gates.to(hidden.dtype))
        keep = ~novice if active is None else active & ~novice
        return mapped.clamp_min(0), keep, mix @ vectors

    def observed(self, observer, router_index: torch.Tensor):
        """``observer`` (statistics) as it sees this layer: the router's ids ``[T, k]`` (novice pairs included),
        the outputs of the physical experts (`moebench.moe.kernels.Observer`)."""
        return _RouterIds(observer, router_index)


class _RouterIds:
    """An observer wrapper that reports the router's ids instead of the physical experts' ids."""

    def __init__(self, observer, index: torch.Tensor):
        self.observer, self.index = observer, index

    def routed(self, experts, hidden, index, weights, outputs, *rest):
        self.observer.routed(experts, hidden, self.index, weights, outputs, *rest)


def validate_novices(view: MoEView, keep: Mapping, novice: Mapping) -> tuple[dict, dict]:
    """``(keep, novice)`` checked against the model and normalised (int keys, sorted ids, float32 vectors).

    In each layer of ``novice`` the kept and replaced ids must be distinct ids of the router that
    together cover all of its experts, with one ``[H]`` finite vector per replaced expert. Group-limited
    routers need no equal drops per group: the router is unchanged. Raises `MoEError` naming every problem.
    """
    problems, keep_out, novice_out = [], {int(k): sorted(int(e) for e in v) for k, v in keep.items()}, {}
    by_index = {layer.index: layer for layer in view.layers}
    for key, entry in novice.items():
        index, where = int(key), f"layer {key}"
        layer = by_index.get(index)
        if layer is None:
            problems.append(f"{where}: not an MoE layer (MoE layers: {sorted(by_index)})")
            continue
        n, replaced = layer.num_experts, sorted(int(e) for e in entry["experts"])
        kept = keep_out.setdefault(index, [e for e in range(n) if e not in set(replaced)])
        vectors = entry.get("vectors")
        if not isinstance(vectors, torch.Tensor):
            problems.append(f"{where}: novice vectors are {type(vectors).__name__}, not a tensor (a plan read "
                            "without Plan.load, which reads them from the file beside plan.json?)")
            continue
        if len(set(replaced)) != len(replaced) or len(set(kept)) != len(kept) or set(kept) & set(replaced) \
                or sorted(kept + replaced) != list(range(n)):
            problems.append(f"{where}: kept {kept} and replaced {replaced} must be distinct ids covering 0..{n - 1}")
        elif tuple(vectors.shape) != (len(replaced), view.config.hidden_size) or not torch.isfinite(vectors).all():
            problems.append(f"{where}: novice vectors {list(vectors.shape)} must be finite [{len(replaced)}, "
                            f"{view.config.hidden_size}] (one per replaced expert)")
        novice_out[index] = {"experts": replaced, "vectors": vectors.detach().to("cpu", torch.float32)}
    for index, kept in keep_out.items():  # a layer without novices keeps every expert (no pruning beside them)
        layer = by_index.get(index)
        if index not in novice_out and layer is not None and kept != list(range(layer.num_experts)):
            problems.append(f"layer {index}: keeps {kept} but replaces no expert; a novice plan removes experts only "
                            "by replacing them")
    if problems:
        raise MoEError("invalid novice experts:\n  " + "\n  ".join(problems))
    return keep_out, novice_out


def novice_refusal(view: MoEView) -> str | None:
    """Why novices cannot be put into this model's family (None when they can)."""
    if view.family.experts_slot and not view.family.gate_scales_input:
        return None
    return (f"{view.family.name}: novice experts (MoNE) replace an expert's output f_e(x) by a constant scaled by "
            "the gate the model applies to that output; this family's experts run outside transformers' "
            "experts slot and its gate scales the expert's input (y = f_e(g x)), so there is no output gate to "
            "scale a constant with. Use a pruning method (moebench methods) for this family")


def attach_novices(model: nn.Module, keep: Mapping, novice: Mapping, physical: bool = True) -> dict:
    """Put ``novice`` (MoE layer -> ``{"experts", "vectors"}``) in effect on ``model``, in place.

    ``physical``: remove the replaced experts' tensors (else keep them in memory, routing them to their
    constants). Switches the model to moebench's experts kernel. Returns the normalised novice set.
    """
    view = MoEView(model)
    refusal = novice_refusal(view)
    if refusal:
        raise MoEError(refusal)
    if is_masked(model):
        raise MoEError("this model has a routing mask; call moebench.moe.ops.unmask(model) before adding novices")
    keep, novice = validate_novices(view, keep, novice)
    for index, entry in novice.items():
        layer = view.layer(index)
        if hasattr(layer.experts, NOVICE_ATTR):
            raise MoEError(f"layer {index} has novice experts already; load the base model again")
        if not entry["experts"]:
            continue
        n_router, kept = layer.num_experts, keep[index]
        if physical:
            slot_experts(layer, kept)
        setattr(layer.experts, NOVICE_ATTR, Novices(n_router, entry["experts"], entry["vectors"], physical))
    if physical:  # save_pretrained writes it to config.json: moebench's loader rebuilds the layers from it
        setattr(view.config, CONFIG_KEY, {"file": NOVICE_FILE,
                                          "layers": {str(i): e["experts"] for i, e in sorted(novice.items())
                                                     if e["experts"]}})
    switch_to_kernel(model)
    return novice


def attached_novices(model: nn.Module) -> dict[int, dict]:
    """The novice set in effect on ``model`` (empty without novices), vectors in float32 on the CPU."""
    found = {}
    for layer in MoEView(model).layers:
        novices = getattr(layer.experts, NOVICE_ATTR, None)
        if novices is not None:
            found[layer.index] = {"experts": list(novices.replaced), "vectors": novices.vectors,
                                  "physical": novices.physical < novices.n_router}
    return found


def write_novices(path: str, novice: Mapping) -> None:
    """Write a novice set to the safetensors file ``path`` (``layers.<i>.experts`` int64, ``layers.<i>.vectors``
    float32)."""
    from safetensors.torch import save_file

    tensors = {}
    for index, entry in sorted(novice.items()):
        tensors[f"layers.{int(index)}.experts"] = torch.tensor(entry["experts"], dtype=torch.long)
        tensors[f"layers.{int(index)}.vectors"] = entry["vectors"].detach().to("cpu", torch.float32).contiguous()
    save_file(tensors, path)


def read_novices(path: str) -> dict[int, dict]:
    """A novice set written by `write_novices`; a missing or unreadable file raises ValueError naming it."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"{path}: the novice vectors file is missing (MoNE's constants travel beside plan.json "
                         "and in the checkpoint folder); copy it along or make the plan again")
    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable novice vectors file ({err})") from None
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in ("experts", "vectors"):
            raise ValueError(f"{path}: unexpected tensor {name!r} (expected layers.<i>.experts / layers.<i>.vectors)")
        out.setdefault(int(parts[1]), {})[parts[2]] = t
    for index, entry in out.items():
        if set(entry) != {"experts", "vectors"}:
            raise ValueError(f"{path}: layer {index} lacks its {'experts' if 'vectors' in entry else 'vectors'}")
        entry["experts"] = [int(e) for e in entry["experts"].tolist()]
        entry["vectors"] = entry["vectors"].to(torch.float32)
    return dict(sorted(out.items()))


def save_novices(model: nn.Module, out_dir: str, shown_as: str | None = None, **save_kwargs) -> None:
    """Save a model with novices: moebench's fused layout plus ``novices.safetensors`` (with a warning that
    plain transformers cannot load it). Novices in mask mode (experts still in memory) are refused."""
    novice = attached_novices(model)
    if not all(entry["physical"] for entry in novice.values()):
        raise MoEError("the novices of this model keep the replaced experts in memory (apply=mask); apply the plan "
                       "with apply=physical to save a checkpoint")
    warnings.warn(f"novice experts (MoNE): plain transformers cannot load this checkpoint or apply its constant "
                  f"experts; load it with moebench.moe.checkpoint.load_model('{shown_as or out_dir}') or any "
                  "moebench command", NoviceCheckpointWarning, stacklevel=3)
    model.save_pretrained(out_dir, save_original_format=False, **save_kwargs)
    write_novices(os.path.join(out_dir, NOVICE_FILE), novice)


def saved_novice_layers(config) -> dict | None:
    """The ``moebench_novices`` record of a checkpoint's config (None for a checkpoint without novices)."""
    text = getattr(config, "text_config", None) or config
    record = getattr(text, CONFIG_KEY, None)
    return record or None


def attach_saved_novices(model: nn.Module, folder: str, record: Mapping) -> None:
    """Cut a freshly built model's layers as the checkpoint in ``folder`` holds them and attach its novices
    (before its state dict is loaded: the expert tensors then have the saved shapes)."""
    novice = read_novices(os.path.join(folder, os.path.basename(str(record.get("file", NOVICE_FILE)))))
    expected = {int(k): sorted(int(e) for e in v) for k, v in dict(record.get("layers") or {}).items()}
    if {i: e["experts"] for i, e in novice.items()} != expected:
        raise ValueError(f"{folder}: {NOVICE_FILE} names other replaced experts than config.json's {CONFIG_KEY}")
    attach_novices(model, {}, novice, physical=True)
