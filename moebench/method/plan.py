"""Plans: what a method decided, as JSON-serialisable data; `moebench.method.apply` puts one in effect.

``plan.json`` holds ``method``, ``kind``, its ``params``, ``ratio``, the calibration key ``calib``,
``keep`` (MoE decoder-layer index, a string in JSON -> sorted kept expert ids; absent layers keep
every expert), ``skip`` (dynamic skipping: ``{"rule": "naee", "betas": {layer: beta}}``, or null),
``selector`` (select plans: ``{"name": "retrieval" | "predictive", ...}``, everything the per-input
selector needs), ``merge`` (merge plans: MoE layer -> groups ``{"into", "experts", "weights",
"router"?, "perms"?}``, see `moebench.moe.merge`; ``keep`` then holds the ``into`` experts) and
``extra`` (bookkeeping for reports: ``n_experts``, ``keep_frequency``, ...). A plan is complete:
applying a saved plan to the same base model gives the same model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from moebench.limits import plan_problem
from moebench.moe.merge import normalise_group
from moebench.util import atomic_write_text


@dataclass
class Plan:
    """A method's decision for one model, budget and calibration set."""

    method: str
    kind: str
    params: dict = field(default_factory=dict)
    ratio: float | None = None
    calib: str | None = None
    keep: dict[int, list[int]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    skip: dict | None = None
    selector: dict | None = None
    merge: dict[int, list[dict]] | None = None

    def __post_init__(self):
        self.keep = {int(k): sorted(int(i) for i in v) for k, v in self.keep.items()}
        if self.merge is not None:
            self.merge = {int(k): [normalise_group(g) for g in v] for k, v in self.merge.items()}
        if self.skip is not None:
            self.skip = {**self.skip, "betas": {int(k): float(v) for k, v in self.skip["betas"].items()}}

    def experts_kept(self) -> dict[int, int]:
        """Kept expert count per MoE layer."""
        return {i: len(ids) for i, ids in self.keep.items()}

    def to_json(self) -> str:
        """The plan as pretty JSON (layer keys as strings, sorted)."""
        data = asdict(self)
        data["keep"] = {str(i): ids for i, ids in sorted(self.keep.items())}
        if self.skip is not None:
            data["skip"] = {**self.skip, "betas": {str(i): b for i, b in sorted(self.skip["betas"].items())}}
        if self.merge is not None:
            data["merge"] = {str(i): groups for i, groups in sorted(self.merge.items())}
        return json.dumps(data, indent=2, sort_keys=False)

    def save(self, path: str) -> None:
        """Write the plan to ``path`` atomically (temporary file, then rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> Plan:
        """Read a plan written by `save`; a damaged or tampered one raises ValueError naming the file and why."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not readable JSON ({err})") from None
        problem = plan_problem(data)
        if problem:
            raise ValueError(f"{path}: {problem}")
        return cls(**{k: v for k, v in data.items() if k in PLAN_FIELDS})


PLAN_FIELDS = ("method", "kind", "params", "ratio", "calib", "keep", "extra", "skip", "selector", "merge")
