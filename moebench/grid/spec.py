"""Study specs (YAML): parsing, validation of the whole grid before any work, and cell expansion.

Minimal form::

    name: my-study
    models: [testbed-8e]
    methods: [frequency, reap, {name: naee, skip: naee}, {name: random, params: {seed: [0, 1, 2]}}]
    ratios: [0.25, 0.5]
    calibration: [testbed:mix]
    tasks: [testbed_mc]

Optional keys: ``lm_eval`` (num_fewshot, batch_size, limit, or any other argument of
``lm_eval.simple_evaluate``, passed on), ``calib_samples``, ``calib_seq_len``,
``seed``, ``apply`` (physical | mask), ``baseline`` (an unpruned cell per model, default true),
``measure`` (false, or settings of `moebench.measure`), ``executor`` (kind and options),
``include_path`` (extra lm-eval task folders), ``dtype``, ``device``, and the statistics settings
``subsample_tokens`` / ``ratio_samples`` (0 = every calibration token; absent: the defaults).
A method's parameter given as a list expands into one method entry per value; a method entry may
name its own ``calibration`` and ``ratios`` lists instead of the study's, a ``recover`` stage
(``{kind: lora, data: testbed:mix, steps: 200}``, `moebench.method.recover`) and a ``backend``.

``backend``: ``hf`` (default; lm-eval's HF backend on the model in this process) or ``vllm`` (the
cell saves its pruned checkpoint and lm-eval's vLLM backend evaluates it in vLLM's own environment,
`moebench.eval.vllm_env`), per study or per method entry; with it ``vllm_args`` (further lm-eval
``vllm`` model arguments, part of the cell's id), ``vllm_python`` (the environment's Python) and
``keep_checkpoints`` (keep each vLLM cell's checkpoint in its folder; default: removed once scored).
``sequential: true`` (per study or method entry): calibrate one decoder layer at a time and stream the
pruned checkpoint to disk (`moebench.eval.model.prune_sequentially`), never loading the model whole.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field, fields

from moebench.grid.validate import DEFAULT_MEASURE, MAX_CELLS, STATS_KEYS, as_list, method_entries, validate
from moebench.method.recover import RecoverSpec
from moebench.method.registry import get_method
from moebench.util import read_yaml


class SpecError(ValueError):
    """A study spec with problems; the message lists every problem at once."""


def cell_id(cell: dict) -> str:
    """The id of a cell from its normalised spec dict (`Cell.to_dict`): a hash of its JSON."""
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    """One point of a grid: a model, a method (its parameters and skip rule), a ratio, a calibration
    set, the tasks and how they are evaluated and measured. Its id is a hash of `to_dict`.

    ``lm_eval``: num_fewshot, batch_size, limit and further ``simple_evaluate`` arguments; ``measure``:
    the speed settings or None. ``subsample_tokens`` / ``ratio_samples``: statistics settings, None
    when the spec leaves them to the defaults; a None setting is left out of `to_dict`, so ids of
    cells from specs without them do not change.
    """

    model: str
    method: str
    params: dict
    skip: str
    ratio: float
    calib: str | None
    tasks: tuple[str, ...]
    lm_eval: dict
    measure: dict | None
    calib_samples: int
    calib_seq_len: int | None
    seed: int
    apply: str
    dtype: str
    include_path: tuple[str, ...] = ()
    subsample_tokens: int | None = None
    ratio_samples: int | None = None
    recover: dict | None = None  # a recovery stage after the method (`moebench.method.recover.RecoverSpec`)
    backend: str | None = None  # "vllm": evaluated by lm-eval's vLLM backend on the saved checkpoint; None: hf
    vllm_args: dict | None = None  # further lm-eval vllm model arguments (backend vllm only)
    sequential: bool | None = None  # True: calibrate layer by layer and stream the pruned checkpoint to disk

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def id(self) -> str:
        """The cell's id: the hash of its normalised spec (its folder name)."""
        return cell_id(self.to_dict())

    def to_dict(self) -> dict:
        """The normalised spec, as written to ``spec.json`` (JSON types only)."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        data["tasks"], data["include_path"] = list(self.tasks), list(self.include_path)
        # left out when unset: cells of older specs keep their ids
        for key in (*STATS_KEYS, "recover", "backend", "vllm_args", "sequential"):
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Cell:
        """A cell from its ``spec.json`` form."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k in ("tasks", "include_path") else v) for k, v in data.items() if k in known})

    @property
    def is_baseline(self) -> bool:
        """Whether this is the unpruned reference cell of its model."""
        return get_method(self.method).is_identity

    def model_args(self, stats_dir: str | None = None, device: str | None = None) -> dict:
        """The ``pruned_moe`` model_args of this cell."""
        args = {"pretrained": self.model, "method": self.method, "dtype": self.dtype,
                "batch_size": self.lm_eval["batch_size"], "apply": self.apply, "skip": self.skip,
                "seed": self.seed, **self.params}
        if not self.is_baseline:
            args.update(ratio=self.ratio, calib=self.calib, calib_samples=self.calib_samples,
                        calib_seq_len=self.calib_seq_len, stats_dir=stats_dir,
                        **{key: getattr(self, key) for key in STATS_KEYS})
        if self.sequential and not self.is_baseline:
            args["sequential"] = True
        if self.recover is not None:
            args["recover"] = self.recover["kind"]
            args.update({f"recover_{k}": v for k, v in self.recover.items() if k != "kind"})
        args["device"] = device
        return {k: v for k, v in args.items() if v is not None}

    def needs(self) -> set[str]:
        """Statistic groups this cell's calibration must provide (routing for measured skip thresholds)."""
        groups = set(get_method(self.method).needs_for(self.params))
        return groups | ({"routing"} if self.skip != "none" else set())


@dataclass
class Study:
    """A parsed study: its name, the raw spec, and the cells it expands to."""

    name: str
    spec: dict
    cells: list[Cell] = field(default_factory=list)
    path: str | None = None

    def calibrations(self) -> list[tuple[str, str]]:
        """Distinct (model, calibration source) pairs the cells calibrate on."""
        return sorted({(c.model, c.calib) for c in self.cells if c.calib})


def load_study(path: str) -> Study:
    """Read, validate and expand a study spec file; raises `SpecError` listing every problem."""
    spec = read_yaml(path) or {}
    study = parse_study(spec)
    study.path = os.path.abspath(path)
    return study


def parse_study(spec: dict) -> Study:
    """Validate a spec dict and expand it into cells."""
    problems = validate(spec)
    if problems:
        shown = [p if len(p) <= 400 else p[:400] + "..." for p in problems[:50]]
        more = [f"... and {len(problems) - 50} more"] if len(problems) > 50 else []
        raise SpecError(f"study spec has {len(problems)} problem(s):\n  " + "\n  ".join(shown + more))
    return Study(spec["name"], spec, expand(spec))


def expand(spec: dict) -> list[Cell]:
    """The cells of a valid spec, normalised (calibration-free methods get no calibration)."""
    lm = {"num_fewshot": 0, "batch_size": 8, "limit": None, **(spec.get("lm_eval") or {})}
    measure = spec.get("measure", DEFAULT_MEASURE)
    measure = {**DEFAULT_MEASURE, **measure} if isinstance(measure, dict) else None
    common = {"tasks": tuple(sorted(as_list(spec["tasks"]))), "lm_eval": lm, "measure": measure,
              "calib_samples": spec.get("calib_samples", 128), "calib_seq_len": spec.get("calib_seq_len"),
              "seed": spec.get("seed", 0), "apply": spec.get("apply", "physical"),
              "dtype": spec.get("dtype", "auto"), "include_path": tuple(as_list(spec.get("include_path") or [])),
              **{key: spec.get(key) for key in STATS_KEYS}}
    cells, seen = [], set()
    limit = spec.get("max_cells") or MAX_CELLS

    def sequential_of(entry: dict) -> bool | None:
        """True when the entry (or else the study) says so; None otherwise (ids of other cells unchanged)."""
        chosen = entry["sequential"] if entry["sequential"] is not None else spec.get("sequential", False)
        return True if chosen and not get_method(entry["name"]).is_identity else None

    def backend_of(name: str | None) -> dict:
        """The cell fields of a backend: none for hf (ids of hf cells stay as they were)."""
        if (name or "hf") == "hf":
            return {}
        return {"backend": name, "vllm_args": copy.deepcopy(spec.get("vllm_args")) or None}


    def check_count() -> None:
        if len(cells) > limit:
            raise SpecError(f"the study expands to more than {limit} cells (models x methods x ratios x calibration "
                            f"sets); {'raise' if 'max_cells' in spec else 'set'} max_cells in the spec if that many "
                            "are meant")

    for model in as_list(spec["models"]):
        if spec.get("baseline", True):
            cells.append(Cell(**copy.deepcopy(common), model=model, method="none", params={}, skip="none",
                              ratio=0.0, calib=None, **backend_of(spec.get("backend"))))
        for entry, ratio in ((e, r) for e in method_entries(spec["methods"])
                             for r in e["ratios"] or as_list(spec["ratios"])):
            for calib in entry["calibration"] or as_list(spec.get("calibration") or [None]):
                needs_data = bool(get_method(entry["name"]).needs_for(entry["params"])) or entry["skip"] != "none"
                recover = RecoverSpec.parse(entry["recover"]).to_dict() if entry["recover"] is not None else None
                cell = Cell(**copy.deepcopy(common), model=model, method=entry["name"], params=entry["params"],
                            skip=entry["skip"], ratio=float(ratio), calib=calib if needs_data else None,
                            recover=recover, **backend_of(entry["backend"] or spec.get("backend")),
                            sequential=sequential_of(entry))
                if cell.id not in seen:
                    seen.add(cell.id)
                    cells.append(cell)
                    check_count()
    return cells
