"""Plans: what a method decided, as JSON-serialisable data; `moebench.method.apply` puts one in effect.

``plan.json`` holds ``method``, ``kind``, its ``params``, ``ratio``, the calibration key ``calib``,
``keep`` (MoE decoder-layer index, a string in JSON -> sorted kept expert ids; absent layers keep
every expert), ``skip`` (dynamic skipping: ``{"rule": "naee", "betas": {layer: beta}}``, or null),
``selector`` (select plans: ``{"name": "retrieval" | "predictive", ...}``, everything the per-input
selector needs), ``merge`` (merge plans: MoE layer -> groups ``{"into", "experts", "weights",
"router"?, "perms"?}``, see `moebench.moe.merge`; ``keep`` then holds the ``into`` experts),
``expert_map`` (merge plans that keep every router row, ``router=all``: MoE layer -> ``[E]``, the position
among the sorted ``into`` ids of each expert's group, `moebench.moe.expert_map`; absent or null: the router
is cut to one row per group, as plans written before it) and ``extra`` (bookkeeping for reports:
``n_experts``, ``keep_frequency``, ...), and for MoNE ``novice`` (MoE layer -> ``{"experts": replaced
ids, "vectors": [n, H] float32}``: each replaced expert answers with a constant, `moebench.moe.novice`; in
plan.json ``vectors`` names ``novices.safetensors``, written beside it by `save` and read by `load`;
absent for other methods). A plan is complete:
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
    expert_map: dict[int, list[int]] | None = None
    novice: dict[int, dict] | None = None

    def __post_init__(self):
        self.keep = {int(k): sorted(int(i) for i in v) for k, v in self.keep.items()}
        if self.merge is not None:
            self.merge = {int(k): [normalise_group(g) for g in v] for k, v in self.merge.items()}
        if self.skip is not None:
            self.skip = {**self.skip, "betas": {int(k): float(v) for k, v in self.skip["betas"].items()}}
        if self.expert_map is not None:
            self.expert_map = {int(k): [int(e) for e in v] for k, v in self.expert_map.items()}
        if self.novice is not None:  # vectors: a float32 tensor, or (read from JSON) the name of their file
            self.novice = {int(k): {"experts": sorted(int(e) for e in v["experts"]),
                                    "vectors": v["vectors"].detach().cpu().float()
                                    if hasattr(v["vectors"], "detach") else v["vectors"]}
                           for k, v in self.novice.items()}

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
        if self.expert_map is not None:
            data["expert_map"] = {str(i): m for i, m in sorted(self.expert_map.items())}
        else:  # plans without one read as they did before the field existed
            data.pop("expert_map")
        if self.novice is not None:  # the vectors live in a safetensors file beside plan.json (`save`)
            from moebench.moe.novice import NOVICE_FILE

            data["novice"] = {str(i): {"experts": v["experts"], "vectors": NOVICE_FILE}
                              for i, v in sorted(self.novice.items())}
        else:
            data.pop("novice")
        return json.dumps(data, indent=2, sort_keys=False)

    def save(self, path: str) -> None:
        """Write the plan to ``path`` atomically (temporary file, then rename); novice vectors (MoNE) go to
        ``novices.safetensors`` beside it."""
        if self.novice is not None and any(not isinstance(v["vectors"], str) for v in self.novice.values()):
            import os

            from moebench.moe.novice import NOVICE_FILE, write_novices

            write_novices(os.path.join(os.path.dirname(os.path.abspath(path)), NOVICE_FILE), self.novice)
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
        plan = cls(**{k: v for k, v in data.items() if k in PLAN_FIELDS})
        if plan.novice:  # MoNE's constants, from the file beside plan.json
            plan.novice = _read_novice_vectors(path, plan.novice)
        return plan


def _read_novice_vectors(path: str, novice: dict) -> dict:
    """``novice`` with its vectors read from the file its entries name, beside the plan at ``path``."""
    import os

    from moebench.moe.novice import read_novices

    folder, files, out = os.path.dirname(os.path.abspath(path)), {}, {}
    for index, entry in novice.items():
        name = entry["vectors"]
        if not isinstance(name, str) or os.path.basename(name) != name:
            raise ValueError(f"{path}: novice[{index}].vectors must name a file beside it, not {str(name)[:40]!r}")
        if name not in files:
            files[name] = read_novices(os.path.join(folder, name))
        saved = files[name].get(index)
        if saved is None or saved["experts"] != entry["experts"]:
            raise ValueError(f"{path}: {name} holds no vectors for layer {index}'s replaced experts {entry['experts']}")
        out[index] = {"experts": entry["experts"], "vectors": saved["vectors"]}
    return out


PLAN_FIELDS = ("method", "kind", "params", "ratio", "calib", "keep", "extra", "skip", "selector", "merge",
               "expert_map", "novice")
