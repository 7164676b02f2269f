"""Which panel of a figure a method belongs to: methods grouped by how they decide, at most six a panel.

Facets, in figure order (`FACETS`):

* **static scores**: ``prune`` methods that score experts and keep the best of each layer
  (frequency, soft_activation, ean, reap, weight_norm, premoe);
* **search / enumeration / novices**: other ``prune`` planners: those that search kept sets (naee)
  and MoNE, which replaces the experts it drops by constants;
* **global budgets**: methods that move the budget between layers (grape, evoesap);
* **input-aware**: ``select`` methods that choose experts per input (premoe_taer, prep);
* **merging**: ``merge`` methods (they change weights);
* **skipping composites**: any method run with a skip rule (naee + skip:naee); the panel also draws
  the same pruning without skipping (and without recovery), the comparison the composite is about;
* **other methods**: names this installation does not register.

A cell trained after its method (``reap+lora``, `moebench.method.recover`) is a series of its own in its
method's facet, beside the method without recovery.

The unpruned model (method ``none``) is the reference line of every panel and ``random`` (over its
seeds) the band of every panel, never a series. A method's kind and flags come from its plan
(``kind``) or the method registry. A facet with more than `MAX_SERIES` series is split into panels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import pandas as pd

FACETS = {"static": "static scores", "search": "search / enumeration / novices", "global": "global budgets",
          "input": "input-aware", "merge": "merging", "skip": "skipping composites", "other": "other methods"}
BASELINE, BAND = "baseline", "random"
BAND_METHOD = "random"
MAX_SERIES = 6
GENERIC_CALIBS = ("testbed:mix", "c4")


@cache
def _registered(method: str):
    from moebench.method.registry import load_methods

    return load_methods().get(method)


def registered_kind(method: str) -> str:
    """The registered kind of ``method`` (``prune`` for names this installation does not know)."""
    spec = _registered(method)
    return spec.kind if spec is not None else "prune"


def facet_of(method: str, skip: str = "none", kind: str = "prune") -> str:
    """The facet key of a cell: `BASELINE`, `BAND` or a key of `FACETS` (see the module docstring)."""
    if method == "none":
        return BASELINE
    if skip and skip != "none":
        return "skip"
    if method == BAND_METHOD:
        return BAND
    if kind in ("select", "merge", "skip"):
        return {"select": "input", "merge": "merge", "skip": "skip"}[kind]
    spec = _registered(method)
    if spec is None:
        return "other"
    if spec.global_budget:
        return "global"
    return "static" if spec.scoring else "search"


@dataclass(frozen=True)
class Panel:
    """One panel: a model, a facet, its title and its series as (method label, calibration) pairs."""

    model: str
    facet: str
    title: str
    series: tuple

    def calibs(self) -> list[str]:
        """The calibration sources of the panel's series (data-free ones left out)."""
        return sorted({c for _, c in self.series if c})

    def label(self, method: str, calib: str) -> str:
        """Legend text: the method, with its calibration when the panel shows more than one."""
        return f"{method} [{calib}]" if len(self.calibs()) > 1 and calib else method

    def labels(self) -> list[str]:
        """The legend texts of the panel's series, in order."""
        return [self.label(m, c) for m, c in self.series]

    def variant(self, calib: str) -> int:
        """Line-style index: solid unless the panel mixes calibration sources, then one style per source."""
        calibs = self.calibs()
        return calibs.index(calib) if len(calibs) > 1 and calib in calibs else 0


def primary_calibs(table: pd.DataFrame) -> dict[str, str]:
    """method label -> its primary calibration: generic (testbed:mix, c4) where it has one, else its first."""
    out = {}
    for method, group in table[~table["baseline"]].groupby("method", sort=True):
        calibs = sorted(set(group["calib"]))
        out[method] = ([c for c in GENERIC_CALIBS if c in calibs] or calibs)[0]
    return out


def _series(part: pd.DataFrame, facet: str, shown) -> list[tuple[str, str]]:
    rows = part[part["facet"] == facet]
    keys = sorted({(m, c) for m, c in zip(rows["method"], rows["calib"], strict=True) if shown(m, c)})
    if facet == "skip":  # the same pruning without skipping, beside each composite
        plain = part[(part["skip"] == "none") & ~part["baseline"]]
        plain = plain[plain["recover"] == ""] if "recover" in plain else plain  # the twin, not a recovered cell
        for method_id, calib in sorted(set(zip(rows["method_id"], rows["calib"], strict=True))):
            match = plain[(plain["method_id"] == method_id) & (plain["calib"] == calib)]
            keys += sorted({(m, calib) for m in match["method"]} - set(keys))
        keys = sorted(set(keys), key=lambda k: ("+skip:" in k[0], k))
    return keys


def panels(table: pd.DataFrame, shown=lambda method, calib: True) -> list[Panel]:
    """The panels of a faceted figure: per model, per facet in `FACETS` order, at most `MAX_SERIES` each."""
    out = []
    models = sorted(table["model"].unique())
    for model in models:
        part = table[table["model"] == model]
        for facet, title in FACETS.items():
            keys = _series(part, facet, shown)
            chunks = [keys[i:i + MAX_SERIES] for i in range(0, len(keys), MAX_SERIES)]
            for k, chunk in enumerate(chunks):
                name = title + (f" ({k + 1}/{len(chunks)})" if len(chunks) > 1 else "")
                calibs = sorted({c for _, c in chunk if c})
                name += f"\n{calibs[0]}" if len(calibs) == 1 else ""  # second line: a panel is narrow
                out.append(Panel(model, facet, f"{model}: {name}" if len(models) > 1 else name, tuple(chunk)))
    return out
