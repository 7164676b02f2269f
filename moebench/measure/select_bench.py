"""`moebench bench --method <select method>`: input-aware selection and offloading vs static pruning.

Variants, all on the same seeded prompts ``[batch, prompt_len]``, each paired with the unpruned model
(`moebench.measure.bench`: interleaved in this process, the same experts kernel):

- ``select (mask)``: per request, the signature pass over its prompt and the selector, then the
  forward with per-sample routing masks (every expert stays resident); paired with the same model
  run plainly;
- ``select + offload``: the same with experts in CPU memory and per-layer working sets
  (`moebench.moe.offload`; moebench's kernel); resident expert bytes are the working sets' peak;
  paired with an unpruned copy in moebench's kernel;
- ``static prune``: the experts the first prompt selects removed physically (the same ratio),
  paired with the unpruned copy in the default kernel.

Prefill tokens/s include the selection (signature pass + selector); decode tokens/s are per decode
step (generation minus the prompt's forward, both with the selection, see `moebench.measure.paired`).
Selection time per request, bytes moved and hit rate are printed below the table.
"""

from __future__ import annotations

import copy
import statistics

from moebench.measure.paired import Side
from moebench.measure.speed import _ids
from moebench.method.apply import apply, unchanged
from moebench.method.pipeline import make_plan
from moebench.moe.kernels import KERNEL_NAME, experts_kernel
from moebench.moe.ops import prune


def measure_select(bench, request) -> list[str]:
    """Add the select, select + offload and static-prune rows to ``bench``; returns the notes to print."""
    model, a = bench.model, bench.settings
    plan = make_plan(model, bench.tokenizer, request)
    label = f"{plan.method} {request.ratio if request.ratio is not None else f'keep {request.keep}'}"
    notes = []
    runner = apply(model, plan)  # selects per request; the weights are untouched
    bench.compare(Side("unpruned", unchanged(model)), [(Side(f"{label} select (mask)", runner), bench.columns(model))])
    notes.append(f"{label}: selection per request {1e3 * statistics.median(runner.select_seconds):.2f} ms median "
                 f"(signature pass over the prompt + selector), {len(runner.select_seconds)} requests")
    reference = copy.deepcopy(model)  # unpruned, beside the offloaded and the pruned model
    ref = unchanged(reference)
    runner = apply(model, plan, offload=True)
    columns = bench.columns(model)
    bench.compare(Side("unpruned, moebench kernel", ref, lambda: experts_kernel(reference, KERNEL_NAME)),
                  [(Side(f"{label} select + offload", runner), columns)])
    c = dict(runner.offloader.counters)
    bench.rows[-1]["expert_bytes"] = c["resident_bytes_peak"]
    requests = len(runner.select_seconds)
    notes.append(f"{label} + offload: resident expert bytes peak {c['resident_bytes_peak'] / 1e6:.2f} MB of "
                 f"{c['unpruned_expert_bytes'] / 1e6:.2f} MB unpruned (held in host memory: "
                 f"{runner.offloader.host_bytes / 1e6:.2f} MB); moved {c['bytes_moved'] / 1e6:.2f} MB "
                 f"({c['bytes_moved'] / max(requests, 1) / 1e6:.3f} MB per request); hit rate {c['hit_rate']:.3f}; "
                 f"devices {sorted({str(st.device) for st in runner.offloader.stores})}")
    runner.close()  # the experts and the previous kernel are back
    keep = runner.select(_ids(model, 1, a.prompt_len)[0].tolist())
    prune(model, keep)
    bench.compare(Side("unpruned", ref), [(Side(f"{label} static prune (first prompt's selection)", unchanged(model)),
                                           bench.columns(model))])
    return notes
