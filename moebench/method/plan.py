"""Plans: what a method decided, as JSON-serialisable data.

``plan.json`` holds ``method``, its ``params``, ``ratio``, the calibration key ``calib``, and
``keep``: MoE decoder-layer index (a string in JSON) -> sorted kept expert ids. Methods that do
more than keep a static set add their data under ``extra`` (per-layer skip thresholds, selector
state, ...).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

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

    def __post_init__(self):
        self.keep = {int(k): sorted(int(i) for i in v) for k, v in self.keep.items()}

    def experts_kept(self) -> dict[int, int]:
        """Kept expert count per MoE layer."""
        return {i: len(ids) for i, ids in self.keep.items()}

    def to_json(self) -> str:
        """The plan as pretty JSON (layer keys as strings, sorted)."""
        data = asdict(self)
        data["keep"] = {str(i): ids for i, ids in sorted(self.keep.items())}
        return json.dumps(data, indent=2, sort_keys=False)

    def save(self, path: str) -> None:
        """Write the plan to ``path`` atomically (temporary file, then rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> "Plan":
        """Read a plan written by `save`."""
        with open(path) as f:
            return cls(**json.load(f))
