"""Type and range checks of a study spec's values, before anything is written.

Scalars (name, calibration sizes, seed, dtype, device, ...), the shape of the lists (models,
methods, ratios, tasks, calibration), ``lm_eval`` keys against the parameters of lm-eval's own
``simple_evaluate`` (read from its signature) and ``executor`` options against the executor's
fields. Each problem is a line naming the key, the value and what would do.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

from moebench.calib.sources import calibration_size_problem
from moebench.util import check_name, did_you_mean

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
METHOD_KEYS = ("name", "params", "skip", "calibration", "ratios", "recover", "backend", "sequential")
DEFAULT_SEQ_LEN = 2048  # the upper bound of the default calibration length
# simple_evaluate parameters a study sets through its own keys (or that make no sense for a cell).
LM_EVAL_RESERVED = {
    "model": "each cell's model is pruned_moe", "model_args": "a cell builds them from the study",
    "tasks": "use the study's 'tasks'", "task_manager": "use the study's 'include_path'",
    "device": "use the study's 'device'", "random_seed": "use the study's 'seed'",
    "numpy_random_seed": "use the study's 'seed'", "torch_random_seed": "use the study's 'seed'",
    "fewshot_random_seed": "use the study's 'seed'", "evaluation_tracker": "cells write their own results",
    "max_batch_size": "it applies to models lm-eval loads by name; use batch_size",
}
_ANNOTATION_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
                     "dict": (dict,), "list": (list,), "tuple": (list,)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split_union(text: str) -> list[str]:
    """``"int | dict[str, int | str] | None"`` -> its top-level alternatives."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [*parts, current.strip()]


def accepts(annotation, value) -> bool:
    """Whether ``value`` (from YAML) fits a parameter's annotation; unknown annotations accept anything."""
    if annotation is inspect.Parameter.empty or annotation is None:
        return True
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    for part in _split_union(text):
        types = _ANNOTATION_TYPES.get(part.split("[", 1)[0].strip().rsplit(".", 1)[-1])
        if types is None:
            return True
        if isinstance(value, bool) and bool not in types:
            continue
        if isinstance(value, types):
            return True
    return False


def check_values(spec: dict) -> list[str]:
    """Problems with the types and ranges of a spec's values (the list shapes first)."""
    problems = _check_name(spec) + list_problems(spec)
    problems += [f"ratio {r!r} must be a number in [0, 1): the fraction of routed experts removed"
                 for r in all_ratios(spec)
                 if isinstance(r, (int, float)) and not isinstance(r, bool) and not 0 <= r < 1]
    problems += _check_calibration_size(spec)
    if "seed" in spec and not (_is_int(spec["seed"]) and spec["seed"] >= 0):
        problems.append(f"seed={spec['seed']!r} must be a whole number >= 0")
    if "baseline" in spec and not isinstance(spec["baseline"], bool):
        problems.append(f"baseline={spec['baseline']!r} must be true or false")
    if spec.get("dtype", "auto") not in DTYPES:
        problems.append(f"dtype={spec['dtype']!r} must be one of {', '.join(DTYPES)}"
                        f"{did_you_mean(str(spec['dtype']), DTYPES)}")
    problems += _check_device(spec.get("device"))
    for key in ("description", "stats_dir"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            problems.append(f"{key}={spec[key]!r} must be text")
    problems += _check_include_path(spec.get("include_path"))
    problems += check_lm_eval(spec.get("lm_eval"))
    problems += check_executor(spec.get("executor"))
    return problems


def _check_name(spec: dict) -> list[str]:
    try:
        check_name(spec.get("name"), "study name")
    except ValueError as err:
        return [str(err)]
    return []


def _names(key: str, value) -> list[str]:
    items = value if isinstance(value, list) else [value]
    bad = [v for v in items if not isinstance(v, str) or not v.strip()]
    return [f"{key}: {v!r} must be a name (text)" for v in bad]


def all_ratios(spec: dict) -> list:
    """The study's ratios and those a method entry names for itself (``{name: m_smoe, ratios: [...]}``)."""
    def listed(value):
        return value if isinstance(value, list) else [value]

    ratios = listed(spec.get("ratios"))
    methods = spec.get("methods")
    for item in listed(methods):
        if isinstance(item, dict) and item.get("ratios") is not None:
            ratios += listed(item["ratios"])
    return list(dict.fromkeys(ratios)) if all(isinstance(r, (int, float)) for r in ratios) else ratios


def list_problems(spec: dict) -> list[str]:
    """The shape of the lists: models, tasks and calibration are names; ratios numbers; methods names
    or mappings with a name. (Later checks read them so; ranges are checked in `check_values`.)"""
    problems = []
    for key in ("models", "tasks", "calibration"):
        if spec.get(key) is not None:
            problems += _names(key, spec[key])
    for r in all_ratios(spec):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            problems.append(f"ratio {r!r} must be a number in [0, 1): the fraction of routed experts removed")
    methods = spec.get("methods")
    for item in methods if isinstance(methods, list) else [methods]:
        problems += _check_method_entry(item)
    return problems


def _check_method_entry(item) -> list[str]:
    if isinstance(item, str) and item.strip():
        return []
    if not isinstance(item, dict):
        return [f"methods: {item!r} must be a method name or a mapping with {', '.join(METHOD_KEYS)}"]
    if not isinstance(item.get("name"), str):
        guess = next((k for k in item if isinstance(k, str) and k not in METHOD_KEYS), None)
        hint = f"; write it as {{name: {guess}, params: {{...}}}}" if guess else ""
        return [f"methods: entry {item!r} has no 'name'{hint}"]
    problems = [f"method {item['name']}: unknown key {k!r}{did_you_mean(str(k), METHOD_KEYS)} "
                f"(known: {', '.join(METHOD_KEYS)})" for k in item if k not in METHOD_KEYS]
    if item.get("params") is not None and not isinstance(item["params"], dict):
        problems.append(f"method {item['name']}: params={item['params']!r} must be a mapping of parameter values")
    if not isinstance(item.get("skip", "none"), str):
        problems.append(f"method {item['name']}: skip={item['skip']!r} must be none or naee")
    if item.get("calibration") is not None:
        problems += _names(f"method {item['name']}: calibration", item["calibration"])
    return problems


def _check_calibration_size(spec: dict) -> list[str]:
    samples = spec.get("calib_samples", 128)
    seq_len = spec.get("calib_seq_len")
    problem = calibration_size_problem(samples, DEFAULT_SEQ_LEN if seq_len is None else seq_len,
                                       ("calib_samples", "calib_seq_len"))
    if problem and seq_len is None and "calibration tokens" in problem:
        problem += f" (calib_seq_len defaults to at most {DEFAULT_SEQ_LEN})"
    return [problem] if problem else []


def _check_device(device) -> list[str]:
    if device is None:
        return []
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return [f"device={device!r} must be a torch device: cpu, cuda, cuda:1, mps (or leave it out)"]
    return []


def _check_include_path(value) -> list[str]:
    if value is None:
        return []
    problems = _names("include_path", value)
    return problems or [f"include_path: {p!r} is not a folder of lm-eval task configs"
                        for p in (value if isinstance(value, list) else [value]) if not os.path.isdir(p)]


def check_lm_eval(options) -> list[str]:
    """Problems with the ``lm_eval`` mapping: names and types against ``lm_eval.simple_evaluate``, ranges."""
    if options is None:
        return []
    if not isinstance(options, dict):
        return [f"lm_eval={options!r} must be a mapping, e.g. {{num_fewshot: 0, batch_size: 8}}"]
    import lm_eval

    params = inspect.signature(lm_eval.simple_evaluate).parameters
    known = sorted(set(params) - set(LM_EVAL_RESERVED))
    problems = []
    for key, value in options.items():
        if key in LM_EVAL_RESERVED:
            problems.append(f"lm_eval: {key!r} is set by moebench ({LM_EVAL_RESERVED[key]})")
        elif key not in params:
            problems.append(f"lm_eval: unknown key {key!r}{did_you_mean(str(key), known)}; lm_eval.simple_evaluate "
                            f"takes {', '.join(known)}")
        elif key != "batch_size" and not accepts(params[key].annotation, value):
            problems.append(f"lm_eval: {key}={value!r} must be {params[key].annotation}")
    return problems + _lm_eval_ranges(options)


def _lm_eval_ranges(options: dict) -> list[str]:
    problems = []
    fewshot = options.get("num_fewshot")
    if _is_int(fewshot) and fewshot < 0:
        problems.append(f"lm_eval: num_fewshot={fewshot} must be >= 0")
    limit = options.get("limit")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and (
            limit <= 0 or (isinstance(limit, float) and limit > 1)):
        problems.append(f"lm_eval: limit={limit!r} must be a whole number of items >= 1 or a fraction in (0, 1]")
    batch = options.get("batch_size", 8)
    if not ((_is_int(batch) and batch >= 1) or (isinstance(batch, str) and (batch == "auto" or (
            batch.startswith("auto:") and batch[5:].isdigit())))):
        problems.append(f"lm_eval: batch_size={batch!r} must be a whole number >= 1, 'auto' or 'auto:N'")
    iters = options.get("bootstrap_iters")
    if _is_int(iters) and iters < 0:
        problems.append(f"lm_eval: bootstrap_iters={iters} must be >= 0")
    return problems


AT_LEAST_ONE = ("parallel", "max_parallel", "time_min", "cpus_per_task")


def check_executor(options) -> list[str]:
    """Problems with the ``executor`` mapping: its kind and each option against the executor's fields."""
    if options is None:
        return []
    if not isinstance(options, dict):
        return [f"executor={options!r} must be a mapping, e.g. {{kind: local, parallel: 2}}"]
    from moebench.grid.executors import EXECUTORS

    kind = options.get("kind", "local")
    if kind not in EXECUTORS:
        return [f"executor: kind={kind!r} must be one of {', '.join(EXECUTORS)}{did_you_mean(str(kind), EXECUTORS)}"]
    try:
        from moebench.grid.executors import _executor_class

        fields = {f.name: f.type for f in dataclasses.fields(_executor_class(kind))}
    except ImportError as err:
        return [f"executor: kind={kind} needs a package that is missing ({err}); pip install submitit"]
    problems = []
    for key, value in options.items():
        if key == "kind":
            continue
        if key not in fields:
            problems.append(f"executor: unknown option {key!r} for the {kind} executor"
                            f"{did_you_mean(str(key), fields)} (known: {', '.join(fields)})")
        elif not accepts(fields[key], value):
            problems.append(f"executor: {key}={value!r} must be {fields[key]}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value < (1 if key in AT_LEAST_ONE else 0)):
            problems.append(f"executor: {key}={value!r} must be >= {1 if key in AT_LEAST_ONE else 0}")
    return problems
