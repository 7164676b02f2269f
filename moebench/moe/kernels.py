"""moebench's expert kernel, registered in transformers' experts-implementation slot.

transformers >= 5 calls ``experts.forward(hidden [T,H], top_k_index [T,k], top_k_weights [T,k])``
through ``ExpertsInterface``; `use_moebench_kernel` switches a model to the kernel registered here.
It computes each selected (token, expert) pair once, like the eager kernel, and hands every
expert's outputs to an observer attached to the experts module (statistics collection), so
observation needs no copy of any modeling code. With no observer it is a plain loop kernel.

Both paths first sort the routed (token, expert) pairs by expert on the device (a stable sort:
tokens stay ascending per expert; pairs a skip rule drops or with an invalid id sort last) and
count them per expert (``bincount``), with no host synchronisation (ours):

- grouped: the sorted pairs run as two grouped matmuls over the resident fused tensors
  (``F.grouped_mm`` with the counts' cumulative sums as offsets; dropped pairs lie beyond the last
  offset and are never computed), no Python loop over experts and no synchronisation. Taken on
  accelerators wherever ``grouped_mm`` runs for the device and dtype, and on CPUs up to
  ``DECODE_MAX_TOKENS`` tokens (decode; beyond, the loop measured faster there).
- loop: one copy of the counts to the host (one synchronisation per layer call), then each hit
  expert on its slice of the sorted pairs. Taken otherwise, and always with an offloading provider
  (it supplies one expert's weights at a time).

An observer sees every hit expert's (tokens, gates, outputs) on either path (the grouped path then
reads the counts once). `moebench bench-kernel` prints both paths' speed against transformers'
default kernel.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_NAME = "moebench"
_OBSERVER_ATTR = "_moebench_observer"
SKIP_ATTR = "_moebench_skip"
PROVIDER_ATTR = "_moebench_provider"  # offloading: object with forward(experts, e, x [n, H]) -> [n, H]
# novice experts (MoNE): object with split(hidden, index, weights, active) -> (index, active, extra [T, H]):
# router ids -> physical experts, novice pairs inactive, their gate x constant vector summed (`moebench.moe.novice`)
NOVICE_ATTR = "_moebench_novices"
# Inputs of at most this many tokens take the grouped path on CPU (ours: at decode, batch 1-8, it
# matched or beat transformers' grouped_mm kernel on Mixtral and Qwen3-30B layers; from a few hundred
# tokens on the loop was faster). 0 = always loop.
DECODE_MAX_TOKENS = 16


class Observer(Protocol):
    """Receives what the kernel computes in one MoE layer's forward."""

    def routed(self, experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
               outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """``outputs[e] = (token ids [n], gate values [n], expert outputs [n, H])`` for each hit expert."""


def is_transposed(experts: nn.Module) -> bool:
    """Whether the fused expert tensors are stored ``[E, in, out]`` (``x @ W``) rather than ``[E, out, in]``.

    Modules without the flag (Llama4) are transposed.
    """
    return bool(getattr(experts, "is_transposed", not hasattr(experts, "has_gate")))


def expert_forward(experts: nn.Module, e: int, x: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    """Output ``[n, H]`` of expert ``e`` of a fused experts module on inputs ``x [n, H]`` (no gate).

    Reads the layout from the module (``is_transposed``, ``has_bias``, ``_apply_gate``) as the
    transformers kernels do; modules without those flags (Llama4) are transposed, bias-free and gated.
    ``weights``: expert e's tensors by name (from an offloading provider) instead of the module's.
    """
    transposed = is_transposed(experts)
    bias = getattr(experts, "has_bias", False)

    def w(name):
        return weights[name] if weights is not None else getattr(experts, name)[e]

    def linear(inp, weight, b):
        out = inp @ weight if transposed else F.linear(inp, weight)
        return out + b if b is not None else out

    h = linear(x, w("gate_up_proj"), w("gate_up_proj_bias") if bias else None)
    if hasattr(experts, "_apply_gate"):
        h = experts._apply_gate(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    return linear(h, w("down_proj"), w("down_proj_bias") if bias else None)


def run_expert(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """`expert_forward` of expert ``e`` on ``x``, through the offloading provider where one is attached (the
    experts then live in its host store, not on the module)."""
    provider = getattr(experts, PROVIDER_ATTR, None)
    return provider.forward(experts, e, x) if provider is not None else expert_forward(experts, e, x)


def grouped_expert_forward(experts: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                           offsets: torch.Tensor) -> torch.Tensor:
    """Outputs ``[S, H]`` of the experts ``expert_ids [S]`` (sorted) on the rows ``x [S, H]``, no gate.

    The same computation as `expert_forward` row by row, as two grouped matmuls over the fused
    tensors; ``offsets [E]`` (int32) is the cumulative row count per expert.
    """
    transposed = is_transposed(experts)
    bias = getattr(experts, "has_bias", False)

    def linear(inp, name):
        weight = getattr(experts, name)
        out = F.grouped_mm(inp, weight if transposed else weight.transpose(-2, -1), offs=offsets)
        return out + getattr(experts, f"{name}_bias")[expert_ids] if bias else out

    h = linear(x, "gate_up_proj")
    if hasattr(experts, "_apply_gate"):
        h = experts._apply_gate(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    return linear(h, "down_proj")


def _sorted_pairs(self, top_k_index: torch.Tensor, active: torch.Tensor | None):
    """The routed pairs sorted by expert, on the device: ``(token [S], slot [S], expert [S], counts [E])``
    with S = T k; pairs a skip rule dropped or with an invalid id carry expert E and sort last (not counted)."""
    n_experts, k = self.num_experts, top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    valid = (flat >= 0) & (flat < n_experts)
    if active is not None:
        valid = valid & active.reshape(-1)
    expert, order = torch.sort(torch.where(valid, flat, n_experts), stable=True)  # tokens stay ascending
    token = torch.div(order, k, rounding_mode="floor")
    counts = torch.bincount(expert, minlength=n_experts + 1)[:n_experts]
    return token, order - token * k, expert, counts


def _report(observer, module, hidden, index, weights, token, gate, y, counts) -> None:
    """Hand the observer each hit expert's (tokens, gates, outputs) from the sorted pairs (one host copy)."""
    outputs, start = {}, 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outputs[e] = (token[start:start + n], gate[start:start + n], y[start:start + n])
            start += n
    observer.routed(module, hidden, index, weights, outputs)


def _grouped(self, hidden, top_k_index, top_k_weights, active, observer) -> torch.Tensor:
    """The grouped path: two grouped matmuls over the sorted pairs, no synchronisation (without an observer)."""
    token, slot, expert, counts = _sorted_pairs(self, top_k_index, active)
    live = expert < self.num_experts
    y = grouped_expert_forward(self, hidden[token], expert.clamp_max(self.num_experts - 1),
                               counts.cumsum(0, dtype=torch.int32))
    y = torch.where(live.unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device))  # rows never computed
    gate = top_k_weights[token, slot]
    if observer is not None:
        _report(observer, self, hidden, top_k_index, top_k_weights, token, gate, y, counts)
    gate = torch.where(live, gate, torch.zeros((), dtype=gate.dtype, device=gate.device))
    contrib = y * gate.unsqueeze(-1).to(y.dtype)
    if hidden.device.type == "cpu":  # few tokens: out[t] = sum of t's pairs as a [T, S] x [S, H] matmul (no scatter)
        combine = torch.zeros(hidden.shape[0], len(token), dtype=y.dtype, device=y.device)
        combine[token, torch.arange(len(token), device=token.device)] = 1
        return (combine @ contrib).to(hidden.dtype)
    return torch.zeros_like(hidden).index_add_(0, token, contrib.to(hidden.dtype))


def _loop(self, hidden, top_k_index, top_k_weights, active, observer, provider) -> torch.Tensor:
    """The loop path: the counts copied to the host once, then each hit expert on its slice of the sorted pairs."""
    token, slot, _, counts = _sorted_pairs(self, top_k_index, active)
    out = torch.zeros_like(hidden)
    outputs, start = {}, 0
    for e, n in enumerate(counts.tolist()):
        if not n:
            continue
        t, s = token[start:start + n], slot[start:start + n]
        start += n
        y = provider.forward(self, e, hidden[t]) if provider is not None else expert_forward(self, e, hidden[t])
        gate = top_k_weights[t, s]
        out.index_add_(0, t, (y * gate.unsqueeze(-1)).to(out.dtype))
        if observer is not None:
            outputs[e] = (t, gate, y)
    if observer is not None:
        observer.routed(self, hidden, top_k_index, top_k_weights, outputs)
    return out


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` runs for ``device`` and ``dtype`` here (tried once on tiny tensors, remembered)."""
    key = (device.type if device.type == "cpu" else str(device), dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(F, "grouped_mm")
        if ok:
            try:
                a = torch.zeros(16, 16, dtype=dtype, device=device)
                b = torch.zeros(2, 16, 16, dtype=dtype, device=device)
                F.grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


def uses_grouped_path(hidden: torch.Tensor, provider) -> bool:
    """Whether the kernel takes its grouped path for ``hidden [T, H]`` (see the module docstring)."""
    if provider is not None or not grouped_mm_runs(hidden.device, hidden.dtype):
        return False
    return hidden.device.type != "cpu" or hidden.shape[0] <= DECODE_MAX_TOKENS


def moebench_experts_forward(self: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """Kernel over the hit experts; reports per-expert outputs to an attached observer.

    The grouped path or the loop (see the module docstring). With a skip rule attached
    (`moebench.moe.skipping`), the (token, expert) pairs it drops are never computed: they are sorted
    past the computed ones and their weight is redistributed. With novice experts attached
    (`moebench.moe.novice`, MoNE) the router's ids are mapped to the physical experts and a pair routed
    to a replaced expert adds its gate times the expert's constant vector instead of running it.
    """
    observer = getattr(self, _OBSERVER_ATTR, None)
    skip = getattr(self, SKIP_ATTR, None)
    provider = getattr(self, PROVIDER_ATTR, None)
    active = None
    if skip is not None:
        top_k_weights, active = skip(top_k_weights)
    novices = getattr(self, NOVICE_ATTR, None)
    if novices is not None:  # router ids -> physical experts; novice pairs add gate x constant, no expert runs
        if observer is not None:  # it sees the router's ids (routing statistics), outputs by physical expert
            observer = novices.observed(observer, top_k_index)
        top_k_index, active, constant = novices.split(hidden, top_k_index, top_k_weights, active)
    if uses_grouped_path(hidden, provider):
        out = _grouped(self, hidden, top_k_index, top_k_weights, active, observer)
    else:
        out = _loop(self, hidden, top_k_index, top_k_weights, active, observer, provider)
    return out if novices is None else out + constant


def register() -> None:
    """Register the kernel under the name ``"moebench"`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(KERNEL_NAME, moebench_experts_forward)


_BEFORE_ATTR = "_moebench_kernel_before"


def switch_to_kernel(model: nn.Module) -> None:
    """Switch ``model`` to moebench's kernel, remembering the kernel it had (for `restore_kernel`)."""
    register()
    current = getattr(model.config, "_experts_implementation", None)
    if current != KERNEL_NAME and not hasattr(model, _BEFORE_ATTR):
        setattr(model, _BEFORE_ATTR, current)
    model.set_experts_implementation(KERNEL_NAME)


def restore_kernel(model: nn.Module) -> None:
    """Give ``model`` back the kernel it had before `switch_to_kernel`, unless a skip rule, an offloading
    provider or novice experts still need moebench's (then the last one removed restores it)."""
    if any(hasattr(m, SKIP_ATTR) or hasattr(m, PROVIDER_ATTR) or hasattr(m, NOVICE_ATTR) for m in model.modules()):
        return
    if hasattr(model, _BEFORE_ATTR):
        before = getattr(model, _BEFORE_ATTR)
        delattr(model, _BEFORE_ATTR)
        if before is not None and getattr(model.config, "_experts_implementation", None) == KERNEL_NAME:
            model.set_experts_implementation(before)


@contextmanager
def experts_kernel(model: nn.Module, name: str | None):
    """Run ``model`` with the experts kernel ``name`` inside the block (no change for None); its kernel is
    restored afterwards."""
    before = getattr(model.config, "_experts_implementation", None)
    switch = name is not None and name != before
    if switch:
        model.set_experts_implementation(name)
    try:
        yield model
    finally:
        if switch and before is not None:
            model.set_experts_implementation(before)


@contextmanager
def use_moebench_kernel(model: nn.Module):
    """Run ``model`` with the moebench kernel inside the block; restore its kernel afterwards."""
    register()
    with experts_kernel(model, KERNEL_NAME):
        yield model


@contextmanager
def observing(experts_modules: list[nn.Module], observers: list[Observer]):
    """Attach one observer per experts module for the duration of the block."""
    for module, observer in zip(experts_modules, observers, strict=True):
        setattr(module, _OBSERVER_ATTR, observer)
    try:
        yield
    finally:
        for module in experts_modules:
            if hasattr(module, _OBSERVER_ATTR):
                delattr(module, _OBSERVER_ATTR)
