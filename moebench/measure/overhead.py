"""Wall time of ``pruned_moe`` with ``method=none`` vs ``hf``.

Both models run the same lm-eval task in one process, alternating (hf, pruned_moe, hf, ...) so
drift in machine load falls on both; each run loads the model and evaluates, as the lm-eval
command line does. Returns every run's seconds, the medians and their ratio, and checks that the
two give the same scores (``method=none`` must be the unpruned model exactly). The target is a
ratio <= 1.03 (pruned_moe costs at most 3% more wall time).
"""

from __future__ import annotations

import statistics
import time


def evaluate_once(kind: str, pretrained: str, options: dict, task_manager) -> tuple[float, dict]:
    """Load ``pretrained`` as lm-eval model ``kind`` and evaluate; returns (wall seconds, scores)."""
    import lm_eval

    model_args = f"pretrained={pretrained},dtype={options['dtype']},device={options['device']}"
    if kind == "pruned_moe":
        model_args += ",method=none"
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=kind, model_args=model_args, tasks=options["tasks"],
                                  batch_size=options["batch_size"], limit=options["limit"], task_manager=task_manager,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    seconds = time.perf_counter() - start
    scores = {task: {k: v for k, v in values.items() if isinstance(v, float) and "stderr" not in k}
              for task, values in out["results"].items()}
    return seconds, scores




def compare_overhead(model: str, tasks: list[str], reps: int = 3, include_path: str | None = None,
                     batch_size: str = "16", limit: int | None = None, device: str | None = None,
                     dtype: str = "float32") -> dict:
    """Alternate hf and pruned_moe runs after one warm-up; returns every run's seconds, the medians,
    their ratio and whether the scores agree."""
    from moebench.eval.plugin import register
    from moebench.moe.checkpoint import default_device, resolve
    from moebench.tasks import task_manager

    if reps < 1:
        raise ValueError(f"--reps {reps} must be >= 1")
    register()
    options = {"tasks": tasks, "batch_size": batch_size, "limit": limit, "device": device or default_device(),
               "dtype": dtype}
    pretrained = resolve(model)
    manager = task_manager(tasks, [include_path] if include_path else [])
    evaluate_once("hf", pretrained, options, manager)  # warm-up: imports, task data, file caches
    times: dict[str, list[float]] = {"hf": [], "pruned_moe": []}
    scores: dict[str, dict] = {}
    for rep in range(reps):
        for kind in (("hf", "pruned_moe") if rep % 2 == 0 else ("pruned_moe", "hf")):
            seconds, scores[kind] = evaluate_once(kind, pretrained, options, manager)
            times[kind].append(seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"times": times, "medians": medians, "ratio": medians["pruned_moe"] / medians["hf"],
            "same": scores["hf"] == scores["pruned_moe"], "device": options["device"]}
