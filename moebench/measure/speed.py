"""Speed and memory measurements: warm up, synchronise, then time; report median and p90.

Used by `moebench bench` and by the grid. Inputs are random token ids (the speed of a forward pass
does not depend on which tokens), seeded so runs are comparable.
"""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

from moebench.method.apply import Applied, unchanged
from moebench.moe.view import MoEView


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@torch.no_grad()
def decode_speed(model: nn.Module, batch: int = 1, prompt: int = 32, new_tokens: int = 32, reps: int = 5,
                 warmup: int = 1, runner: Applied | None = None) -> dict:
    """Decode throughput: greedy generation of exactly ``new_tokens`` after a ``prompt``, per token.

    Generation = the prompt's forward (which yields the first new token) + ``new_tokens - 1`` decode
    steps; decode time = generation time - the prompt's forward (with KV cache), per decode step.
    Work done once per request (a selection pass, say) is in both and cancels.
    """
    if new_tokens < 2:
        raise ValueError(f"decode speed needs new_tokens >= 2 (got {new_tokens}): the first new token comes "
                         "from the prompt's forward, decode steps are the rest")
    runner = runner or unchanged(model)
    ids = _ids(model, batch, prompt, seed=1)
    prefill = _timed(lambda: runner.forward(ids, use_cache=True), ids.device, reps, warmup)
    total = _timed(lambda: runner.generate(ids, new_tokens), ids.device, reps, warmup)
    decode_times = [max(t - statistics.median(prefill), 1e-9) for t in total]
    return {**summary(decode_times, batch * (new_tokens - 1)), "prefill_s": statistics.median(prefill)}


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
    """Accumulates wall time spent inside the routed experts modules (synchronised); yields a dict."""
    view, spent, starts = MoEView(model), {"experts_s": 0.0}, {}
    device = next(model.parameters()).device

    def before(module, args):
        _sync(device)
        starts[id(module)] = time.perf_counter()

    def after(module, args, output):
        _sync(device)
        spent["experts_s"] += time.perf_counter() - starts.pop(id(module))

    hooks = [h for layer in view.layers for h in (layer.experts.register_forward_pre_hook(before),
                                                  layer.experts.register_forward_hook(after))]
    try:
        yield spent
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def expert_share(model: nn.Module, batch: int = 1, length: int = 128, reps: int = 3) -> float:
    """Fraction of a prefill forward's wall time spent in the routed experts."""
    ids = _ids(model, batch, length)
    model(input_ids=ids, use_cache=False)
    with expert_timer(model) as spent:
        times = _timed(lambda: model(input_ids=ids, use_cache=False), ids.device, reps, 0)
    return spent["experts_s"] / sum(times)


def weight_bytes(model: nn.Module) -> dict:
    """Resident weight bytes: routed experts and everything else."""
    view = MoEView(model)
    experts, total = view.expert_bytes(), view.total_bytes()
    return {"expert_bytes": experts, "other_bytes": total - experts, "total_bytes": total,
            "parameters": sum(p.numel() for p in model.parameters())}


def peak_memory(device: torch.device | str) -> dict:
    """Peak memory so far: CUDA allocated / reserved on a GPU, the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window (CUDA only; process RSS peaks cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
