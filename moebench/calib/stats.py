"""Calibration statistics of every MoE layer, collected in one forward pass per calibration set.

Statistics come in seven groups, collected together or separately (a method names the groups it
needs; the cache collects only the groups it lacks). Notation: on a token x routed to expert e
with gate g_e(x) (the value the model really computes), y_e(x) is the expert's output as the
model computes it: f_e(x) where the gate scales the output, f_e(g_e x) where it scales the input
(Llama4, `Family.gate_scales_input`); c_e(x) is its contribution to the block output: g_e y_e,
or y_e itself where the gate scales the input.

``routing`` (per layer, float64 accumulators)
    ``tokens [1]``; ``counts [E]`` top-k selections; ``gate_sum [E]`` sum of g_e over routed
    tokens; ``softmax_sum [E]`` sum of softmax(logits) over all tokens; ``score_sum [E]`` sum of
    the family's own score function of the logits (softmax, or sigmoid for sigmoid routers) over
    all tokens; ``coact [E, E]`` co-selection counts; ``ratio_samples [N]`` float32 second/first
    gate value of every token (``ratio_samples`` setting 0), or of a seeded uniform subsample
    (NAEE skipping's beta is their median).
``norms`` (routed tokens only)
    ``norm_sum [E]`` sum of ||y_e(x)||; ``norm_sq_sum [E]`` sum of ||y_e(x)||^2;
    ``gate_norm_sum [E]`` sum of ||c_e(x)|| (= g_e ||y_e||; ||y_e|| where the gate scales the
    input); ``norm_count [E]`` tokens counted. The REAP authors' reading, for ``gate=reference``:
    ``ref_norm_sum [E]`` sum of ||f_e(x)|| on the ungated input (= ``norm_sum`` unless the gate
    scales the input); ``ref_gate_norm_sum [E]`` sum of p_e(x) ||f_e(x)||, p = softmax over all
    logits, renormalised over the token's chosen experts only when ``config.norm_topk_prob``.
``logits`` (every token)
    ``topk_logits [N, K]`` float32 and ``topk_ids [N, K]`` int64 of the K largest router logits,
    ``sample_ids [N]`` the calibration sequence of each token.
``outputs`` (a seeded subsample of ``subsample_tokens`` tokens; 0: every token)
    ``inputs [n, H]`` router inputs, ``logits [n, E]``, ``all_outputs [n, E, H]`` every expert's
    output y_e on each token (where the gate scales the input, with the gate the expert would get
    if chosen, which depends on its own logit only), ``sample_ids [n]``.
``router_gram`` (every token, float64; for merging by router-logit similarity)
    ``logit_gram [E, E]`` sum over tokens of l l^T, l the router logits: cosine similarity of two
    experts' logit columns is ``G_ij / sqrt(G_ii G_jj)`` with no per-token data kept.
``expert_means`` (every token, float64; for merging by expert outputs)
    ``output_sum [E, H]`` sum over all tokens of every expert's output y_e (as in ``outputs``), routed or not;
    ``output_tokens [1]`` tokens summed (the mean output is their ratio). One ``[E, H]`` per layer.
``routed_moments`` (routed tokens only, float64; for MoNE's novices: one pass, running sums, no per-token data)
    ``routed_sum [E, H]`` sum of y_e(x) over the tokens routed to e; ``routed_sq_sum [E, H]`` sum of
    y_e(x)^2 per hidden unit; ``routed_count [E]`` tokens counted (mean: their ratio; unbiased variance
    per unit: (sq_sum - sum^2 / count) / (count - 1)); ``sequence_fluctuation [E, H]`` the MoNE authors'
    running variance estimate, updated one calibration sequence at a time as their code updates it once
    per (one-sequence) batch: with n tokens seen before and T in the sequence, mean m' over all n + T,
    fluc <- fluc (n - 1) / (n + T - 1) + sum over the T of (y - m')^2 / (n + T), skipped while n = 0
    (the expert's first sequence only sets the mean). It depends on how tokens form sequences (the
    calibration key), not on the batch size.

Expert outputs are observed through moebench's kernel in transformers' experts-implementation
slot (`moebench.moe.kernels`); families without that slot (Llama4) are observed by a block hook that
runs the same per-expert function on the inputs the model feeds it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moebench.moe.formats import quantized_experts_refusal
from moebench.moe.kernels import observing, run_expert, use_moebench_kernel
from moebench.moe.view import MoEError, MoELayer, MoEView
from moebench.util import on_terminal, open_nofollow, pid_alive

OUTPUT_CHUNK_ELEMENTS = 1 << 26  # every expert's outputs are computed this many elements at a time (128 MiB bf16)

GROUP_STATS = {
    "routing": ("tokens", "counts", "gate_sum", "softmax_sum", "score_sum", "coact", "ratio_samples"),
    "norms": ("norm_sum", "norm_sq_sum", "gate_norm_sum", "norm_count", "ref_norm_sum", "ref_gate_norm_sum"),
    "logits": ("topk_logits", "topk_ids", "sample_ids"),
    "outputs": ("inputs", "logits", "all_outputs", "outputs_sample_ids"),
    "router_gram": ("logit_gram",),
    "expert_means": ("output_sum", "output_tokens"),
    "routed_moments": ("routed_sum", "routed_sq_sum", "routed_count", "sequence_fluctuation"),
}
GROUPS = tuple(GROUP_STATS)
FORMAT_VERSION = 2  # 2: files carry their format, group and layers (validated); settings in the key


ALL_TOKENS = 0  # a subsample size meaning "every calibration token"


@dataclass
class CollectSettings:
    """Knobs of one collection pass (part of the cache key where they change results).

    ``subsample_tokens``: tokens whose every expert output is kept (``outputs`` group; 0 = all).
    The authors of NAEE use every calibration token; holding ``[n, E, H]`` per layer for all
    layers at once grows with the calibration set (Mixtral-8x7B at 128 x 2048 tokens: 34 GB per
    layer), so the default is a seeded uniform subsample of 2048 tokens.
    ``ratio_samples``: tokens whose second/first gate ratio is kept for beta (0 = all, the
    authors' choice: 4 bytes per token and layer, ~1 MB per layer at 128 x 2048 tokens).
    """

    batch_size: int = 4
    subsample_tokens: int = 2048
    ratio_samples: int = ALL_TOKENS
    logits_top: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in ("subsample_tokens", "ratio_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a whole number >= 0 (0 = every calibration token)")


def subsample(total: int, size: int, seed: int) -> torch.Tensor | None:
    """Sorted positions of a seeded uniform sample of ``size`` of ``total`` tokens; None for all of them."""
    if size == ALL_TOKENS or size >= total:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:size].sort().values


@dataclass
class _LayerAccumulator:
    """Collects the requested groups for one MoE layer across batches.

    ``chosen``: global token positions of the ``outputs`` subsample (sorted; None = every token);
    ``ratio_chosen``: the same for the gate ratios.
    """

    layer: MoELayer
    groups: set[str]
    settings: CollectSettings
    chosen: torch.Tensor | None
    seq_len: int
    offset: int = 0
    data: dict[str, object] = field(default_factory=dict)
    pending: tuple | None = None
    ratio_chosen: torch.Tensor | None = None
    spill: str | None = None  # file the ``all_outputs`` rows are appended to (None: kept in memory)
    spilled: int = 0  # rows written to ``spill``
    spill_shape: tuple = ()  # ``(E, H)`` of each spilled row

    def router_seen(self, module, args, output) -> None:
        """Router forward hook: keep its input and logits for the kernel call that follows."""
        logits = output[1] if self.layer.family.router_output == "dense_scores" else output[0]
        self.pending = (args[0].reshape(-1, args[0].shape[-1]).detach(), logits.detach().float())

    def routed(self, experts, hidden, index, weights, outputs, ungated=None) -> None:
        """Kernel observer: update every requested group with one batch of T tokens.

        ``outputs[e] = (token ids, gates, y_e)``; ``ungated[e]``: f_e on the ungated inputs of
        those tokens where the gate scales the input (None: the same as y_e).
        """
        inputs, logits = self.pending
        t = index.shape[0]
        positions = torch.arange(self.offset, self.offset + t)
        if "routing" in self.groups:
            self._routing(logits, index, weights, positions)
        if "norms" in self.groups:
            self._norms(outputs, ungated or {}, logits, index)
        if "logits" in self.groups:
            self._logits(logits, positions)
        if "outputs" in self.groups:
            self._outputs(experts, inputs, logits, positions)
        if "router_gram" in self.groups:
            finite = logits.masked_fill(~torch.isfinite(logits), 0.0).double()  # masked routers give -inf
            self._add("logit_gram", finite.T @ finite)
        if "expert_means" in self.groups:
            self._expert_means(experts, inputs, logits)
        if "routed_moments" in self.groups:
            self._routed_moments(outputs, t, hidden.shape[-1], logits.device)
        self.offset += t

    def _add(self, name: str, value: torch.Tensor) -> None:
        """Accumulate in float64 on the value's device (copied to the CPU once, in `result`)."""
        value = value.detach().to(torch.float64)
        self.data[name] = self.data[name] + value if name in self.data else value

    def _append(self, name: str, value: torch.Tensor) -> None:
        self.data.setdefault(name, []).append(value.detach().cpu())

    def _routing(self, logits, index, weights, positions) -> None:
        n = logits.shape[-1]
        hits = torch.zeros(index.shape[0], n, device=index.device).scatter_(1, index, 1.0)
        self._add("tokens", torch.tensor([index.shape[0]]))
        self._add("counts", hits.sum(0))
        self._add("gate_sum", torch.zeros_like(hits).scatter_(1, index, weights.float()).sum(0))
        self._add("softmax_sum", torch.softmax(logits, dim=-1).sum(0))
        self._add("score_sum", self.layer.dense_scores(logits).sum(0))
        self._add("coact", hits.T @ hits)
        if weights.shape[-1] >= 2:
            top = weights.float().topk(2, dim=-1).values
            ratios = (top[:, 1] / top[:, 0].clamp_min(1e-30)).cpu()
            if self.ratio_chosen is not None:
                ratios = ratios[torch.isin(positions, self.ratio_chosen)]
            self._append("ratio_samples", ratios)

    def _norms(self, outputs, ungated, logits, index) -> None:
        """Per-expert norm sums, accumulated on the device (no copy to the host per expert)."""
        n = self.layer.num_experts
        sums = {k: torch.zeros(n, dtype=torch.float64, device=logits.device) for k in GROUP_STATS["norms"]}
        reference = _reference_gates(self.layer, logits, index)
        for e, (token, gate, y) in outputs.items():
            norm = y.float().norm(dim=-1).double()
            plain = ungated[e].float().norm(dim=-1).double() if e in ungated else norm
            weight = self.layer.output_weights(gate.double())
            sums["norm_sum"][e] += norm.sum()
            sums["norm_sq_sum"][e] += (norm ** 2).sum()
            sums["gate_norm_sum"][e] += (weight * norm).sum()
            sums["norm_count"][e] += len(token)
            sums["ref_norm_sum"][e] += plain.sum()
            sums["ref_gate_norm_sum"][e] += (reference[token.to(reference.device), e] * plain).sum()
        for name, value in sums.items():
            self._add(name, value)

    def _logits(self, logits, positions) -> None:
        k = min(self.settings.logits_top, logits.shape[-1])
        top = logits.topk(k, dim=-1)
        self._append("topk_logits", top.values.cpu())
        self._append("topk_ids", top.indices.cpu())
        self._append("sample_ids", positions // self.seq_len)

    def _every_expert(self, experts, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Every expert's output y_e on ``x [n, H]`` as the model computes it, ``[n, E, H]``: where the
        gate scales the input (Llama4), with the gate the expert would get if chosen (its own logit)."""
        gates = self.layer.expert_gates(logits) if self.layer.family.gate_scales_input else None
        with torch.no_grad():
            return torch.stack([run_expert(experts, e, x if gates is None else x * gates[:, e:e + 1].to(x.dtype))
                                for e in range(self.layer.num_experts)], dim=1)

    def _outputs(self, experts, inputs, logits, positions) -> None:
        everyone = self.chosen is None
        keep = torch.ones_like(positions, dtype=torch.bool) if everyone else torch.isin(positions, self.chosen)
        if not keep.any():
            return
        rows = keep.nonzero().squeeze(1).to(inputs.device)
        self._append("sub_inputs", inputs[rows].float())
        self._append("sub_logits", logits[rows])
        # every expert on every kept token, a bounded chunk of tokens at a time ([chunk, E, H] on the device)
        chunk = max(1, OUTPUT_CHUNK_ELEMENTS // (self.layer.num_experts * inputs.shape[-1]))
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            ys = self._every_expert(experts, inputs[part], logits[part]).float().cpu()
            if self.spill is None:
                self._append("all_outputs", ys)
            else:  # on disk as the pass goes: the pass never holds every layer's outputs
                with os.fdopen(open_nofollow(self.spill, os.O_WRONLY | os.O_APPEND), "ab") as f:
                    f.write(memoryview(ys.contiguous().numpy()).cast("B"))
                self.spilled += ys.shape[0]
                self.spill_shape = tuple(ys.shape[1:])
        self._append("sub_sample_ids", positions[keep] // self.seq_len)

    def _expert_means(self, experts, inputs, logits) -> None:
        """Add every expert's summed output y_e over the batch's tokens, one expert at a time (summed in
        float64 on the device, no ``[T, E, H]`` tensor)."""
        gates = self.layer.expert_gates(logits) if self.layer.family.gate_scales_input else None
        total = torch.zeros(self.layer.num_experts, inputs.shape[-1], dtype=torch.float64, device=inputs.device)
        with torch.no_grad():
            for e in range(self.layer.num_experts):
                x = inputs if gates is None else inputs * gates[:, e:e + 1].to(inputs.dtype)
                total[e] = run_expert(experts, e, x).sum(0, dtype=torch.float64)
        self._add("output_sum", total)
        self._add("output_tokens", torch.tensor([inputs.shape[0]]))

    def _routed_moments(self, outputs, t: int, hidden_size: int, device) -> None:
        """Per-expert sums of y_e and y_e^2 over routed tokens, and the MoNE authors' per-sequence running
        fluctuation (see the module docstring), all float64 on the device."""
        n_experts, first = self.layer.num_experts, self.offset // self.seq_len
        n_seq = (self.offset + t - 1) // self.seq_len - first + 1
        f64 = {"dtype": torch.float64, "device": device}
        sums = torch.zeros(n_seq, n_experts, hidden_size, **f64)
        squares = torch.zeros_like(sums)
        counts = torch.zeros(n_seq, n_experts, **f64)
        for e, (token, _gate, y) in outputs.items():
            y = y.double()
            seq = torch.div(self.offset + token.to(device), self.seq_len, rounding_mode="floor") - first
            sums[:, e].index_add_(0, seq, y)
            squares[:, e].index_add_(0, seq, y * y)
            counts[:, e].index_add_(0, seq, torch.ones(len(seq), **f64))
        seen = self.data.get("routed_count", torch.zeros(n_experts, **f64)).clone()
        total = self.data.get("routed_sum", torch.zeros(n_experts, hidden_size, **f64)).clone()
        fluc = self.data.get("sequence_fluctuation", torch.zeros(n_experts, hidden_size, **f64))
        for b in range(n_seq):  # the authors' update, one sequence after the other
            grown = seen + counts[b]
            total = total + sums[b]
            mean = total / grown.clamp_min(1).unsqueeze(-1)
            spread = squares[b] - 2 * mean * sums[b] + counts[b].unsqueeze(-1) * mean ** 2  # sum of (y - m')^2
            shrink = ((seen - 1) / (grown - 1).clamp_min(1)).unsqueeze(-1)
            step = fluc * shrink + spread / grown.clamp_min(1).unsqueeze(-1)
            fluc = torch.where(((counts[b] > 0) & (seen > 0)).unsqueeze(-1), step, fluc)
            seen = grown
        self.data["sequence_fluctuation"] = fluc
        self._add("routed_sum", sums.sum(0))
        self._add("routed_sq_sum", squares.sum(0))
        self._add("routed_count", counts.sum(0))

    def result(self) -> dict[str, torch.Tensor]:
        """The finished statistics of this layer (lists concatenated, names as documented)."""
        rename = {"sub_inputs": "inputs", "sub_logits": "logits", "sub_sample_ids": "outputs_sample_ids"}
        result = {rename.get(k, k): (torch.cat(v) if isinstance(v, list) else v).cpu() for k, v in self.data.items()}
        if self.spilled:  # memory-mapped from the spill file, read page by page when used
            size = self.spilled * self.spill_shape[0] * self.spill_shape[1]
            flat = torch.from_file(self.spill, shared=False, size=size, dtype=torch.float32)
            result["all_outputs"] = flat.view(self.spilled, *self.spill_shape)
        return result


def _reference_gates(layer: MoELayer, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """REAP's released code's gate ``[T, E]`` (float64, on the logits' device): softmax over all logits,
    renormalised over the token's chosen experts only when the config sets ``norm_topk_prob`` (on every family)."""
    p = torch.softmax(logits.float(), dim=-1).double()
    if getattr(layer.config, "norm_topk_prob", False):
        p = p / p.gather(1, index.to(p.device)).sum(-1, keepdim=True)
    return p


def _block_observer(acc: _LayerAccumulator):
    """Block pre-hook for experts outside the kernel slot: route, run the routed experts as the block
    does (on gated inputs where the gate scales the input), observe."""

    def hook(module, args):
        layer = acc.layer
        hidden = args[0].reshape(-1, args[0].shape[-1])
        routing = layer.route(hidden)  # also fires router_seen
        outputs, ungated = {}, {}
        for e in torch.unique(routing.indices).tolist():
            token, slot = torch.where(routing.indices == e)
            gate, x = routing.weights[token, slot], hidden[token]
            if layer.family.gate_scales_input:
                outputs[e] = (token, gate, run_expert(layer.experts, e, x * gate.unsqueeze(-1).to(x.dtype)))
                if "norms" in acc.groups:
                    ungated[e] = run_expert(layer.experts, e, x)
            else:
                outputs[e] = (token, gate, run_expert(layer.experts, e, x))
        acc.routed(layer.experts, hidden, routing.indices, routing.weights, outputs, ungated)

    return hook


def _forward_batches(model, tokens: torch.Tensor, batch_size: int, device, groups, progress: bool) -> None:
    """The calibration forward passes; a bar per batch on a terminal, one line at start and end otherwise."""
    batches = range(0, tokens.shape[0], batch_size)
    bar = progress and on_terminal()
    if progress and not bar:
        print(f"calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens, groups {', '.join(sorted(groups))}, "
              f"{len(batches)} batches ...", file=sys.stderr, flush=True)
    began = time.perf_counter()
    for start in tqdm(batches, desc="calibration", unit="batch", disable=not bar):
        model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    if progress and not bar:
        print(f"calibration: done in {time.perf_counter() - began:.1f}s", file=sys.stderr, flush=True)


SPILL_PREFIX = ".outputs-spill-"


@contextmanager
def spill_folder(parent: str):
    """A fresh folder in ``parent`` for this process's spilled expert outputs (`collect`'s
    ``spill_dir``), removed afterwards; ones that processes no longer running left (killed mid-pass)
    are removed first."""
    for name in os.listdir(parent):
        pid = name[len(SPILL_PREFIX):]
        if name.startswith(SPILL_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    spill = os.path.join(parent, f"{SPILL_PREFIX}{os.getpid()}")
    shutil.rmtree(spill, ignore_errors=True)
    os.makedirs(spill)
    try:
        yield spill
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def spill_file(spill_dir: str, index: int) -> str:
    """The file of MoE layer ``index``'s spilled expert outputs in ``spill_dir`` (see `collect`)."""
    return os.path.join(spill_dir, f"layer-{index}.f32")


def collect(model, tokens: torch.Tensor, groups, settings: CollectSettings | None = None,
            progress: bool = True, spill_dir: str | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Run the calibration ``tokens [S, L]`` through ``model`` once; statistics per MoE layer.

    Returns ``{decoder layer index: {statistic name: tensor}}`` for the requested ``groups``.
    ``spill_dir``: an existing folder where each layer's ``all_outputs`` rows are appended to
    ``layer-<i>.f32`` as the batches pass (returned memory-mapped from there), so the pass holds
    one batch of expert outputs in memory instead of every layer's; the caller removes the folder.
    """
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown statistic groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    settings = settings or CollectSettings()
    view = MoEView(model)
    refusal = quantized_experts_refusal(view)
    if refusal:
        raise MoEError(refusal)
    total = tokens.numel()
    chosen = subsample(total, settings.subsample_tokens, settings.seed)
    ratio_chosen = subsample(total, settings.ratio_samples, settings.seed)
    spill = spill_dir is not None and "outputs" in groups
    accs = [_LayerAccumulator(layer, groups, settings, chosen, tokens.shape[1], ratio_chosen=ratio_chosen,
                              spill=spill_file(spill_dir, layer.index) if spill else None)
            for layer in view.layers]
    for acc in accs:
        if acc.spill:  # start empty: rows of an earlier pass must not precede this one's
            os.close(open_nofollow(acc.spill, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))  # a planted link: refused
    hooks = [acc.layer.router.register_forward_hook(acc.router_seen) for acc in accs]
    slot = [acc for acc in accs if acc.layer.family.experts_slot]
    hooks += [acc.layer.block.register_forward_pre_hook(_block_observer(acc))
              for acc in accs if not acc.layer.family.experts_slot]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), use_moebench_kernel(model), observing([a.layer.experts for a in slot], slot):
            _forward_batches(model, tokens, settings.batch_size, device, groups, progress)
    finally:
        for hook in hooks:
            hook.remove()
    return {acc.layer.index: acc.result() for acc in accs}
