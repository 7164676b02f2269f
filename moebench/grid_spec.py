"""Study specs (YAML): parsing, validation of the whole grid before any work, and cell expansion.

Minimal form::

    name: my-study
    models: [testbed-8e]
    methods: [frequency, reap, {name: naee, skip: naee}, {name: random, params: {seed: [0, 1, 2]}}]
    ratios: [0.25, 0.5]
    calibration: [testbed:mix]
    tasks: [testbed_mc]

Optional keys: ``lm_eval`` (num_fewshot, batch_size, limit), ``calib_samples``, ``calib_seq_len``,
``seed``, ``apply`` (physical | mask), ``baseline`` (an unpruned cell per model, default true),
``measure`` (false, or settings of `moebench.measure`), ``executor`` (kind and options),
``include_path`` (extra lm-eval task folders), ``dtype``, ``device``.
A method's parameter given as a list expands into one method entry per value; a method entry may
name its own ``calibration`` list instead of the study's.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field

import yaml

SPEC_KEYS = {"name", "models", "methods", "ratios", "calibration", "tasks", "lm_eval", "calib_samples",
             "calib_seq_len", "seed", "apply", "baseline", "measure", "executor", "include_path", "dtype",
             "device", "description", "stats_dir"}
REQUIRED = ("name", "models", "methods", "ratios", "tasks")
DEFAULT_MEASURE = {"batch": 1, "prompt_len": 128, "new_tokens": 32, "reps": 5, "warmup": 2,
                   "latency_lengths": [16, 64, 256, 1024, 4096]}


class SpecError(ValueError):
    """A study spec with problems; the message lists every problem at once."""


@dataclass
class Study:
    """A parsed study: its name, the raw spec, and the cells it expands to."""

    name: str
    spec: dict
    cells: list[dict] = field(default_factory=list)
    path: str | None = None

    def calibrations(self) -> list[tuple[str, str]]:
        """Distinct (model, calibration source) pairs the cells calibrate on."""
        return sorted({(c["model"], c["calib"]) for c in self.cells if c["calib"]})


def cell_id(cell: dict) -> str:
    """The id of a cell: a hash of its normalised spec."""
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:12]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _method_entries(raw) -> list[dict]:
    """Methods as dicts {name, params, skip}; list-valued parameters expand to one entry per value."""
    out = []
    for item in _as_list(raw):
        entry = {"name": item, "params": {}, "skip": "none", "calibration": None} if isinstance(item, str) else {
            "name": item.get("name"), "params": dict(item.get("params") or {}), "skip": item.get("skip", "none"),
            "calibration": _as_list(item["calibration"]) if item.get("calibration") else None}
        keys = sorted(entry["params"])
        values = [_as_list(entry["params"][k]) for k in keys]
        for combo in itertools.product(*values):
            out.append({**entry, "params": dict(zip(keys, combo))})
    return out


def load_study(path: str) -> Study:
    """Read, validate and expand a study spec file; raises `SpecError` listing every problem."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    study = parse_study(spec)
    study.path = os.path.abspath(path)
    return study


def parse_study(spec: dict) -> Study:
    """Validate a spec dict and expand it into cells."""
    from moebench.grid_validate import validate

    problems = validate(spec)
    if problems:
        raise SpecError(f"study spec has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return Study(spec["name"], spec, expand(spec))


def expand(spec: dict) -> list[dict]:
    """The cells of a valid spec, normalised (calibration-free methods get no calibration)."""
    from moebench.method import get_method

    lm = {"num_fewshot": 0, "batch_size": 8, "limit": None, **(spec.get("lm_eval") or {})}
    measure = spec.get("measure", DEFAULT_MEASURE)
    measure = {**DEFAULT_MEASURE, **measure} if isinstance(measure, dict) else None
    common = {"tasks": sorted(_as_list(spec["tasks"])), "lm_eval": lm, "measure": measure,
              "calib_samples": spec.get("calib_samples", 128), "calib_seq_len": spec.get("calib_seq_len"),
              "seed": spec.get("seed", 0), "apply": spec.get("apply", "physical"),
              "dtype": spec.get("dtype", "auto"), "include_path": _as_list(spec.get("include_path") or [])}
    cells, seen = [], set()
    for model in _as_list(spec["models"]):
        if spec.get("baseline", True):
            cells.append({**copy.deepcopy(common), "model": model, "method": "none", "params": {}, "skip": "none",
                          "ratio": 0.0, "calib": None})
        for entry, ratio in itertools.product(_method_entries(spec["methods"]), _as_list(spec["ratios"])):
            for calib in entry["calibration"] or _as_list(spec.get("calibration") or [None]):
                needs_data = bool(get_method(entry["name"]).needs) or entry["skip"] != "none"
                cell = {**copy.deepcopy(common), "model": model, "method": entry["name"],
                        "params": entry["params"], "skip": entry["skip"], "ratio": float(ratio),
                        "calib": calib if needs_data else None}
                if cell_id(cell) not in seen:
                    seen.add(cell_id(cell))
                    cells.append(cell)
    return cells
