"""`moebench bench --method <select method>`: input-aware selection and offloading vs static pruning.

Variants, all on the same seeded prompts ``[batch, prompt_len]``:

- ``select (mask)``: per request, the signature pass over its prompt and the selector, then the
  forward with per-sample routing masks (every expert stays resident);
- ``select + offload``: the same with experts in CPU memory and per-layer working sets
  (`moebench.moe.offload`); resident expert bytes are the working sets' peak;
- ``static prune``: the experts the first prompt selects removed physically (the same ratio).

Prefill tokens/s include the selection (signature pass + selector); decode tokens/s are per decode
step (generation minus the prompt's forward, both with the selection, see `moebench.measure`). Selection
time per request, bytes moved and hit rate are printed below the table.
"""

from __future__ import annotations

import statistics

from moebench.measure.speed import _ids, decode_speed, prefill_speed, weight_bytes
from moebench.method.apply import Applied, apply
from moebench.method.pipeline import make_plan
from moebench.moe.ops import prune


def _speeds(runner: Applied, model, a) -> tuple[dict, dict]:
    pre = prefill_speed(model, a.batch, a.prompt_len, a.reps, a.warmup, runner)
    dec = decode_speed(model, a.batch, min(32, a.prompt_len), max(a.new_tokens, 2), a.reps, 1, runner)
    return pre, dec


def measure_select(bench, request) -> list[str]:
    """Add the select, select + offload and static-prune rows to ``bench``; returns the notes to print."""
    model, a = bench.model, bench.settings
    plan = make_plan(model, bench.tokenizer, request)
    label = f"{plan.method} {request.ratio if request.ratio is not None else f'keep {request.keep}'}"
    notes = []
    runner = apply(model, plan)
    pre, dec = _speeds(runner, model, a)
    bench.rows.append({"variant": f"{label} select (mask)", **weight_bytes(model), "prefill": pre, "decode": dec,
                       "skip_rate": 0.0})
    notes.append(f"{label}: selection per request {1e3 * statistics.median(runner.select_seconds):.2f} ms median "
                 f"(signature pass over the prompt + selector), {len(runner.select_seconds)} requests")
    runner = apply(model, plan, offload=True)
    pre, dec = _speeds(runner, model, a)
    c = dict(runner.offloader.counters)
    requests = len(runner.select_seconds)
    bench.rows.append({"variant": f"{label} select + offload", **weight_bytes(model),
                       "expert_bytes": c["resident_bytes_peak"], "prefill": pre, "decode": dec, "skip_rate": 0.0})
    notes.append(f"{label} + offload: resident expert bytes peak {c['resident_bytes_peak'] / 1e6:.2f} MB of "
                 f"{c['unpruned_expert_bytes'] / 1e6:.2f} MB unpruned; moved {c['bytes_moved'] / 1e6:.2f} MB "
                 f"({c['bytes_moved'] / max(requests, 1) / 1e6:.3f} MB per request); hit rate {c['hit_rate']:.3f}; "
                 f"device {runner.offloader.device}")
    runner.close()
    keep = runner.select(_ids(model, 1, a.prompt_len)[0].tolist())
    prune(model, keep)
    bench.measure(f"{label} static prune (first prompt's selection)")
    return notes
