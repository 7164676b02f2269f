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

from moebench.grid.validate import DEFAULT_MEASURE, as_list, method_entries, validate

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


def load_study(path: str) -> Study:
    """Read, validate and expand a study spec file; raises `SpecError` listing every problem."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    study = parse_study(spec)
    study.path = os.path.abspath(path)
    return study


def parse_study(spec: dict) -> Study:
    """Validate a spec dict and expand it into cells."""
    problems = validate(spec)
    if problems:
        raise SpecError(f"study spec has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return Study(spec["name"], spec, expand(spec))


def expand(spec: dict) -> list[dict]:
    """The cells of a valid spec, normalised (calibration-free methods get no calibration)."""
    from moebench.method.registry import get_method

    lm = {"num_fewshot": 0, "batch_size": 8, "limit": None, **(spec.get("lm_eval") or {})}
    measure = spec.get("measure", DEFAULT_MEASURE)
    measure = {**DEFAULT_MEASURE, **measure} if isinstance(measure, dict) else None
    common = {"tasks": sorted(as_list(spec["tasks"])), "lm_eval": lm, "measure": measure,
              "calib_samples": spec.get("calib_samples", 128), "calib_seq_len": spec.get("calib_seq_len"),
              "seed": spec.get("seed", 0), "apply": spec.get("apply", "physical"),
              "dtype": spec.get("dtype", "auto"), "include_path": as_list(spec.get("include_path") or [])}
    cells, seen = [], set()
    for model in as_list(spec["models"]):
        if spec.get("baseline", True):
            cells.append({**copy.deepcopy(common), "model": model, "method": "none", "params": {}, "skip": "none",
                          "ratio": 0.0, "calib": None})
        for entry, ratio in itertools.product(method_entries(spec["methods"]), as_list(spec["ratios"])):
            for calib in entry["calibration"] or as_list(spec.get("calibration") or [None]):
                needs_data = bool(get_method(entry["name"]).needs) or entry["skip"] != "none"
                cell = {**copy.deepcopy(common), "model": model, "method": entry["name"],
                        "params": entry["params"], "skip": entry["skip"], "ratio": float(ratio),
                        "calib": calib if needs_data else None}
                if cell_id(cell) not in seen:
                    seen.add(cell_id(cell))
                    cells.append(cell)
    return cells
