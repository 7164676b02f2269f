"""Speed measurements of one model: warm up, synchronise, then time; report median and p90.

The pieces `moebench.measure.paired` builds on (a variant against its reference) and the variant-alone
latency the grid records. Memory: `moebench.measure.memory`. Inputs are random token ids (the speed of
a forward pass does not depend on which tokens), seeded so runs are comparable.
"""

from __future__ import annotations

import inspect
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from moebench.method.apply import Applied, unchanged
from moebench.moe.view import MoEView


def _sync(device: torch.device) -> None:
    """Wait for every GPU (a model may span several), or nothing on a CPU."""
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def _ids(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(next(model.parameters()).device)


def _timed(fn, device, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _at(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``ordered`` (nearest rank, no interpolation)."""
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(times: list[float], tokens: int) -> dict:
    """Tokens/s at the median and the spread of the measured times.

    ``tokens_per_s_p90`` is the rate at the p90 of the times (the slow end), ``tokens_per_s_p10`` at
    their p10 (the fast end); ``tokens_per_s_min`` / ``_max`` at the slowest / fastest repetition.
    With few repetitions the quantiles are the extremes (nearest rank: 3 reps give p10 = fastest).
    """
    ordered = sorted(times)
    median = statistics.median(times)
    return {"tokens_per_s": tokens / median, "tokens_per_s_p90": tokens / _at(ordered, 0.9),
            "tokens_per_s_p10": tokens / _at(ordered, 0.1), "tokens_per_s_min": tokens / ordered[-1],
            "tokens_per_s_max": tokens / ordered[0], "median_s": median, "reps": len(times)}


@torch.no_grad()
def prefill_speed(model: nn.Module, batch: int = 1, length: int = 128, reps: int = 5, warmup: int = 2,
                  runner: Applied | None = None) -> dict:
    """Prefill throughput: one forward over ``batch x length`` tokens, no KV cache."""
    runner = runner or unchanged(model)
    ids = _ids(model, batch, length)
    device = ids.device
    times = _timed(lambda: runner.forward(ids), device, reps, warmup)
    return summary(times, batch * length)


class DecodeSession:
    """Greedy decoding of ``ids [B, L]`` one step at a time, as generation runs the model: the prompt's forward
    with the KV cache (`start`), then one forward of one new token per sequence (`step`).

    A select plan's per-row selection is made once from the prompts and in effect only inside `start`
    and `step` (so sessions of other sides on the same model can run between the steps).
    """

    def __init__(self, runner: Applied, ids: torch.Tensor):
        self.runner, self.ids = runner, ids
        self.keeps = [runner.select(row.tolist()) for row in ids] if runner.selects else None
        self.cache = self.next = None
        # transformers >= 5.25 names the KV cache ``cache`` (``past_key_values`` before, deprecated since)
        self.cache_arg = "cache" if "cache" in inspect.signature(runner.model.forward).parameters else "past_key_values"

    def _routing(self):
        return self.runner.batch(self.keeps) if self.keeps is not None else nullcontext()

    @torch.no_grad()
    def start(self) -> None:
        with self._routing():
            out = self.runner.model(input_ids=self.ids, use_cache=True)
        self.cache, self.next = out[self.cache_arg], out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step(self) -> None:
        with self._routing():
            out = self.runner.model(input_ids=self.next, use_cache=True, **{self.cache_arg: self.cache})
        self.cache, self.next = out[self.cache_arg], out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_speed(model: nn.Module, batch: int = 1, prompt: int = 32, new_tokens: int = 32, reps: int = 5,
                 warmup: int = 1, runner: Applied | None = None) -> dict:
    """Decode throughput after a ``prompt``: per repetition, the median of the ``new_tokens - 1`` decode steps
    of a `DecodeSession` (token 1 comes from the prompt's forward, timed on its own as ``prefill_s``)."""
    if new_tokens < 2:
        raise ValueError(f"decode speed needs new_tokens >= 2 (got {new_tokens}): the first new token comes "
                         "from the prompt's forward, decode steps are the rest")
    runner = runner or unchanged(model)
    ids = _ids(model, batch, prompt, seed=1)
    prefill = _timed(lambda: runner.forward(ids, use_cache=True), ids.device, reps, warmup)
    per_rep = []
    for rep in range(warmup + reps):
        session = DecodeSession(runner, ids)
        session.start()
        steps = []
        for _ in range(new_tokens - 1):
            _sync(ids.device)
            start = time.perf_counter()
            session.step()
            _sync(ids.device)
            steps.append(time.perf_counter() - start)
        if rep >= warmup:
            per_rep.append(statistics.median(steps))
    return {**summary(per_rep, batch), "prefill_s": statistics.median(prefill)}


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position encoding allows (None when the config sets no limit)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def decode_latency(model: nn.Module, lengths: list[int], batch: int = 1, new_tokens: int = 32, reps: int = 5,
                   warmup: int = 1, runner: Applied | None = None) -> tuple[list[dict], list[int]]:
    """Per-token decode latency after prompts of each length in ``lengths``.

    Returns ``(rows, dropped)``: one row per measured length (``prompt_len``, ``batch``, ``new_tokens``,
    ``ms_per_token``, ``ms_per_token_p10`` and ``ms_per_token_p90``: milliseconds per decode step, i.e.
    per generated token of each sequence, at the median, p10 and p90 of the repetitions; ``prefill_ms``:
    the prompt's forward), and the lengths left out because prompt + new tokens exceed the model's
    ``max_position_embeddings``.
    """
    limit = max_positions(model)
    rows, dropped = [], []
    for length in sorted(set(lengths)):
        if limit is not None and length + new_tokens > limit:
            dropped.append(length)
            continue
        speed = decode_speed(model, batch, length, new_tokens, reps, warmup, runner)
        per_step = 1000.0 * batch / speed["tokens_per_s"]
        rows.append({"prompt_len": length, "batch": batch, "new_tokens": new_tokens, "ms_per_token": per_step,
                     "ms_per_token_p90": 1000.0 * batch / speed["tokens_per_s_p90"],
                     "ms_per_token_p10": 1000.0 * batch / speed["tokens_per_s_p10"],
                     "prefill_ms": 1000.0 * speed["prefill_s"]})
    return rows, dropped


@contextmanager
def expert_timer(model: nn.Module):
    """Accumulates the time spent inside the routed experts modules; yields a dict (``experts_s``, complete
    after the block). On a GPU, CUDA events around each module (read once at the end, so the timing does
    not serialise the forward); on a CPU, the wall clock."""
    view, spent, starts, spans = MoEView(model), {"experts_s": 0.0}, {}, []
    device = next(model.parameters()).device
    cuda = device.type == "cuda"

    def mark():
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def before(module, args):
        starts[id(module)] = mark()

    def after(module, args, output):
        spans.append((starts.pop(id(module)), mark()))

    hooks = [h for layer in view.layers for h in (layer.experts.register_forward_pre_hook(before),
                                                  layer.experts.register_forward_hook(after))]
    try:
        yield spent
    finally:
        for h in hooks:
            h.remove()
        _sync(device)
        spent["experts_s"] = sum(a.elapsed_time(b) / 1000 if cuda else b - a for a, b in spans)


@torch.no_grad()
def expert_share(model: nn.Module, batch: int = 1, length: int = 128, reps: int = 3) -> float:
    """Fraction of a prefill forward's wall time spent in the routed experts."""
    ids = _ids(model, batch, length)
    model(input_ids=ids, use_cache=False)
    with expert_timer(model) as spent:
        times = _timed(lambda: model(input_ids=ids, use_cache=False), ids.device, reps, 0)
    return spent["experts_s"] / sum(times)


def weight_bytes(model: nn.Module) -> dict:
    """Resident weight bytes (`moebench.measure.memory.resident_bytes`): ``expert_bytes``, ``other_bytes``,
    ``total_bytes``, and the number of ``parameters``."""
    from moebench.measure.memory import resident_bytes

    r = resident_bytes(model)
    return {"expert_bytes": r["expert_bytes"], "other_bytes": r["other_bytes"], "total_bytes": r["weight_bytes"],
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
