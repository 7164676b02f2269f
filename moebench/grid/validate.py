"""Validation of a study spec before any work: every problem found, listed at once.

Types and ranges of the values come first (`moebench.grid.checks`); methods, calibration sources,
tasks, models and budgets are checked once the lists are well formed.
"""

from __future__ import annotations

import itertools

from moebench.grid.checks import all_ratios, check_values, list_problems
from moebench.util import did_you_mean

SPEC_KEYS = {"name", "models", "methods", "ratios", "calibration", "tasks", "lm_eval", "calib_samples",
             "calib_seq_len", "seed", "apply", "baseline", "measure", "executor", "include_path", "dtype",
             "device", "description", "stats_dir", "subsample_tokens", "ratio_samples", "max_cells",
             "backend", "vllm_args", "vllm_python", "keep_checkpoints", "sequential"}
BACKENDS = ("hf", "vllm")
MAX_SPEC_VALUES = 20_000  # values a spec may hold, aliases expanded (a real study holds a few hundred)
MAX_CELLS = 5_000  # cells a study may expand to unless its spec sets max_cells
STATS_KEYS = ("subsample_tokens", "ratio_samples")  # statistics settings; 0 = every calibration token
REQUIRED = ("name", "models", "methods", "ratios", "tasks")
DEFAULT_MEASURE = {"batch": 1, "prompt_len": 128, "new_tokens": 32, "reps": 6, "warmup": 2,
                   "latency_lengths": [16, 64, 256, 1024, 4096]}
# measure keys a spec may add; absent, they are left out of the cell (so cell ids stay as they were)
OPTIONAL_MEASURE = {"latency_reps": "reps"}  # key -> the key whose value it defaults to


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def method_entries(raw) -> list[dict]:
    """Methods as dicts {name, params, skip, calibration, ratios}; list-valued parameters expand to one entry
    per value. ``calibration`` / ``ratios``: the entry's own lists instead of the study's (None: the study's)."""
    out = []
    for item in as_list(raw):
        item = {"name": item} if isinstance(item, str) else item
        entry = {"name": item.get("name"), "params": dict(item.get("params") or {}), "skip": item.get("skip", "none"),
                 "calibration": as_list(item["calibration"]) if item.get("calibration") else None,
                 "ratios": as_list(item["ratios"]) if item.get("ratios") else None,
                 "recover": item.get("recover"), "backend": item.get("backend"),
                 "sequential": item.get("sequential")}
        keys = sorted(entry["params"])
        values = [as_list(entry["params"][k]) for k in keys]
        for combo in itertools.product(*values):
            out.append({**entry, "params": dict(zip(keys, combo, strict=True))})
    return out


def validate(spec: dict) -> list[str]:
    """Problems with a spec: unknown keys, methods, parameters, tasks, model families, impossible budgets."""
    if not isinstance(spec, dict):
        return ["the spec must be a YAML mapping with keys name, models, methods, ratios, tasks"]
    too_big = spec_size_problem(spec)
    if too_big:
        return [too_big]
    problems = [f"unknown key {str(k)[:60]!r}{did_you_mean(str(k), SPEC_KEYS)}" for k in spec if k not in SPEC_KEYS]
    problems += [f"missing key {k!r}" for k in REQUIRED if not spec.get(k)]
    if problems and any(p.startswith("missing") for p in problems):
        return problems
    problems += check_values(spec)
    if list_problems(spec):  # the checks below read models, methods, ratios and tasks as names
        return problems
    problems += _check_methods(spec)
    problems += _check_tasks(spec)
    problems += _check_models(spec)
    problems += _check_measure(spec)
    problems += _check_backends(spec)
    problems += _check_sequential(spec)
    for key in STATS_KEYS:
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            problems.append(f"{key}={value!r} must be a whole number >= 0 (tokens kept for the statistics; "
                            "0 = every calibration token)")
    if spec.get("apply", "physical") not in ("physical", "mask"):
        problems.append(f"apply={str(spec['apply'])[:60]!r} must be physical or mask")
    limit = spec.get("max_cells")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        problems.append(f"max_cells={str(limit)[:60]!r} must be a whole number >= 1")
    return problems


def spec_size_problem(spec) -> str | None:
    """Whether a parsed spec holds more than `MAX_SPEC_VALUES` values (YAML aliases counted each time they are
    used, as every later check would walk them), checked before anything else reads it."""
    count, stack = 0, [spec]
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_SPEC_VALUES:
            return (f"the spec holds more than {MAX_SPEC_VALUES} values (YAML anchors and aliases count each time "
                    "they are used); a study needs a few hundred: write it out plainly")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, str) and len(value) > 100_000:
            return f"the spec holds a text of {len(value)} characters; no value of a study is that long"
    return None


def _check_methods(spec) -> list[str]:
    from moebench.method.registry import get_method, load_methods

    problems, methods = [], load_methods()
    for entry in method_entries(spec["methods"]):
        name = entry["name"]
        if name not in methods:
            problems.append(f"method {name!r} is unknown{did_you_mean(name, methods)}")
            continue
        try:
            get_method(name).parse_params(entry["params"])
        except ValueError as err:
            problems.append(str(err))
        if entry["skip"] not in ("none", "naee"):
            problems.append(f"method {name}: skip={entry['skip']!r} must be none or naee")
        if entry["recover"] is not None:
            problems += _recover_problems(spec, name, entry, methods[name])
        if (methods[name].needs or entry["skip"] != "none") and not (spec.get("calibration") or entry["calibration"]):
            problems.append(f"method {name} needs calibration statistics: add a 'calibration' list (e.g. testbed:mix)")
    sources = set(as_list(spec.get("calibration") or []))
    sources |= {c for e in method_entries(spec["methods"]) for c in (e["calibration"] or [])}
    for source in sorted(sources):
        try:
            from moebench.calib.sources import calibration_sources, parse_calibration

            for single in calibration_sources(source):  # testbed:domains, a+b: one pattern per task
                parse_calibration(single)
        except (ValueError, OSError) as err:
            problems.append(f"calibration {source!r}: {err}")
    return problems


def _check_sequential(spec) -> list[str]:
    """``sequential`` (study or method entry): plan on a layer-by-layer skeleton and stream the pruned checkpoint
    to disk (`moebench.eval.model.prune_sequentially`); prune and merge methods that can plan that way only."""
    from moebench.method.registry import get_method, load_methods

    problems = []
    study = spec.get("sequential", False)
    if not isinstance(study, bool):
        return [f"sequential={str(study)[:60]!r} must be true or false"]
    methods = load_methods()
    for entry in method_entries(spec["methods"]):
        own = entry["sequential"]
        if own is not None and not isinstance(own, bool):
            problems.append(f"method {entry['name']}: sequential={str(own)[:60]!r} must be true or false")
            continue
        if not (own if own is not None else study) or entry["name"] not in methods:
            continue
        method = get_method(entry["name"])
        if method.is_identity:
            continue  # the unpruned model has nothing to write
        physical = spec.get("apply", "physical") == "physical"
        if method.kind not in ("prune", "merge") or entry["skip"] != "none" or not physical:
            problems.append(f"method {entry['name']}: sequential writes the pruned checkpoint one layer at a time; it "
                            "needs a prune or merge method with apply: physical and no skip")
            continue
        if entry["recover"] is not None:
            problems.append(f"method {entry['name']}: recover trains the model in memory; sequential never holds it "
                            "whole (leave sequential out for this entry)")
            continue
        try:
            method.check_sequential(entry["params"])
        except ValueError as err:
            problems.append(f"method {entry['name']}: {err}")
    return problems


def _check_backends(spec) -> list[str]:
    """``backend`` (study and method entries), ``vllm_args``, ``vllm_python``, ``keep_checkpoints``; and what vLLM
    cannot evaluate: a method that changes the forward, masks, offloads, or gives layers different expert counts."""
    from moebench.method.registry import get_method, load_methods

    problems = []
    study = spec.get("backend", "hf")
    if study not in BACKENDS:
        problems.append(f"backend={str(study)[:60]!r} must be one of {', '.join(BACKENDS)}")
    args = spec.get("vllm_args")
    if args is not None and not isinstance(args, dict):
        problems.append(f"vllm_args={str(args)[:60]!r} must be a mapping of lm-eval vllm model arguments "
                        "(e.g. {max_model_len: 2048, gpu_memory_utilization: 0.9})")
    elif isinstance(args, dict) and "pretrained" in args:
        problems.append("vllm_args: pretrained is the cell's checkpoint; leave it out")
    python = spec.get("vllm_python")
    if python is not None and not isinstance(python, str):
        problems.append(f"vllm_python={str(python)[:60]!r} must be the path of a Python executable")
    if not isinstance(spec.get("keep_checkpoints", False), bool):
        problems.append("keep_checkpoints must be true or false (keep each vLLM cell's pruned checkpoint)")
    methods = load_methods()
    entries = method_entries(spec["methods"])
    uses = [] if study != "vllm" or not spec.get("baseline", True) else [("none", None)]
    for entry in entries:
        backend = entry["backend"] if entry["backend"] is not None else study
        if backend not in BACKENDS:
            problems.append(f"method {entry['name']}: backend={str(backend)[:60]!r} must be one of "
                            f"{', '.join(BACKENDS)}")
        elif backend == "vllm" and entry["name"] in methods:
            uses.append((entry["name"], entry))
    for name, entry in uses:
        why = vllm_refusal(get_method(name), entry, spec.get("apply", "physical"))
        if why:
            problems.append(f"method {name}: backend vllm: {why}; use backend: hf for it")
    return problems


def vllm_refusal(method, entry: dict | None, apply: str) -> str | None:
    """Why vLLM cannot evaluate this method entry, or None. vLLM evaluates a saved checkpoint, with its own
    forward, and builds every MoE layer with one expert count."""
    if method.kind not in ("prune", "merge"):
        return (f"a {method.kind} method changes the forward per request; vLLM runs its own forward on a saved "
                "checkpoint")
    if entry and entry.get("skip", "none") != "none":
        return f"skip={entry['skip']} skips experts per token inside the forward; vLLM runs its own"
    if apply != "physical" and not method.is_identity:
        return f"apply={apply} keeps every expert and masks the router inside the forward; vLLM needs apply: physical"
    if method.moebench_only:
        return method.moebench_only
    params = method.parse_params((entry or {}).get("params"))
    every_row = method.kind == "merge" and params.get("router", "all") == "all"  # written with all E slots
    if method.global_budget and not every_row:
        return ("it sets each layer's expert count from one global budget, and vLLM builds every MoE layer with "
                "one count (a checkpoint with per-layer counts does not load)")
    return None


def _recover_problems(spec, name: str, entry: dict, method) -> list[str]:
    """A method entry's ``recover`` stage: its settings, and a method and apply mode it can follow."""
    from moebench.method.recover import RecoverSpec, refusal

    try:
        RecoverSpec.parse(entry["recover"], f"method {name}: recover")
    except ValueError as err:
        return [str(err)]
    why = refusal(method.kind, entry["skip"], spec.get("apply", "physical"))
    return [f"method {name}: {why}"] if why else []


def _check_measure(spec) -> list[str]:
    measure = spec.get("measure", DEFAULT_MEASURE)
    if measure is False or measure is None:
        return []
    if not isinstance(measure, dict):
        return [f"measure={measure!r} must be false or a mapping of {sorted(DEFAULT_MEASURE)}"]
    known = {**DEFAULT_MEASURE, **OPTIONAL_MEASURE}
    problems = [f"measure: unknown key {k!r}{did_you_mean(k, known)}" for k in measure if k not in known]
    for key in ("batch", "prompt_len", "new_tokens", "reps", *OPTIONAL_MEASURE):
        if key in OPTIONAL_MEASURE and key not in measure:
            continue
        value = measure[key] if key in OPTIONAL_MEASURE else measure.get(key, DEFAULT_MEASURE[key])
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"measure: {key}={value!r} must be a whole number >= 1")
    new_tokens = measure.get("new_tokens", DEFAULT_MEASURE["new_tokens"])
    if isinstance(new_tokens, int) and new_tokens == 1:
        problems.append("measure: new_tokens=1 must be >= 2 (the first new token comes from the prompt's "
                        "forward; decode speed is measured over the steps after it)")
    warmup = measure.get("warmup", DEFAULT_MEASURE["warmup"])
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        problems.append(f"measure: warmup={warmup!r} must be a whole number >= 0")
    lengths = measure.get("latency_lengths", DEFAULT_MEASURE["latency_lengths"])
    if not isinstance(lengths, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                for n in lengths):
        problems.append(f"measure: latency_lengths={lengths!r} must be a list of prompt lengths >= 1 "
                        "(an empty list measures no latency)")
    return problems


def _check_tasks(spec) -> list[str]:
    from moebench.tasks import task_manager

    tasks = as_list(spec["tasks"])
    known = set(task_manager(tasks, as_list(spec.get("include_path") or [])).all_tasks)
    return [f"task {t!r} is unknown to lm-eval{did_you_mean(t, known)}" for t in tasks if t not in known]


def _check_models(spec) -> list[str]:
    from moebench.method.registry import resolve_budget
    from moebench.moe.checkpoint import load_structure
    from moebench.moe.view import MoEError, MoEView

    problems = []
    for model in as_list(spec["models"]):
        try:
            view = MoEView(load_structure(model))
            _ = view.layers  # resolving the layers raises MoEError for an unsupported structure
        except (MoEError, OSError, ValueError) as err:
            problems.append(f"model {model!r}: {str(err).splitlines()[0]}")
            continue
        for ratio in all_ratios(spec):
            if isinstance(ratio, (int, float)) and 0 <= ratio < 1:
                try:
                    resolve_budget(view, ratio=float(ratio))
                except (MoEError, ValueError) as err:
                    lines = str(err).splitlines()
                    problems.append(f"model {model!r}, ratio {ratio}: {lines[min(1, len(lines) - 1)].strip()}")
    return problems
