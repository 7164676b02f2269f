"""The demo's findings (F1-F6), stated with the measured numbers whichever way they come out.

Every number comes from the study's tidy tables through `moebench.report.tables.summary`
(average accuracy over the multiple-choice tasks) and `moebench.report.domains`. A finding whose
cells are absent says so instead of guessing.
"""

from __future__ import annotations

import pandas as pd

from moebench.method.registry import load_methods
from moebench.report.domains import calibration_effect
from moebench.report.tables import MetricSpec, StudyData, summary

GENERIC = ("testbed:mix", "c4")


def _acc(table: pd.DataFrame, method: str, ratio: float, calib_generic: bool = True,
         skip: str = "none") -> float | None:
    rows = table[(table["method_id"] == method) & (table["ratio"] == ratio) & (table["skip"] == skip)]
    if calib_generic:
        rows = rows[rows["calib"].isin(GENERIC) | (rows["calib"] == "")]
    values = rows["accuracy"].dropna()
    return float(values.mean()) if len(values) else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _verdict(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "not measured"
    return "yes" if a > b else ("tie" if a == b else "no")


def f1(table: pd.DataFrame) -> str:
    """Does enumeration (NAEE) or REAP beat frequency and random at 25% and 50%?"""
    parts = []
    for ratio in (0.25, 0.5):
        acc = {m: _acc(table, m, ratio) for m in ("naee", "reap", "frequency", "random")}
        best_new = max((v for k, v in acc.items() if k in ("naee", "reap") and v is not None), default=None)
        best_old = max((v for k, v in acc.items() if k in ("frequency", "random") and v is not None), default=None)
        parts.append(f"at {ratio:.0%}: NAEE {_fmt(acc['naee'])}, REAP {_fmt(acc['reap'])}, frequency "
                     f"{_fmt(acc['frequency'])}, random {_fmt(acc['random'])} (mean over seeds) -> "
                     f"{_verdict(best_new, best_old)}")
    return "F1 (enumeration / REAP vs frequency / random): " + "; ".join(parts)


def f2(study: StudyData, table: pd.DataFrame, spec: MetricSpec) -> str:
    """Does domain calibration beat generic calibration on the domain's own task?"""
    effect = calibration_effect(study, table, spec)
    if effect.empty:
        return "F2 (domain vs generic calibration): not measured (no domain-calibrated cells)"
    wins, total = int((effect["delta"] > 0).sum()), len(effect)
    lines = [f"{r.method} {r.ratio:.0%} on {r.task}: {r.generic:.3f} -> {r.domain:.3f}"
             for r in effect.itertuples(index=False)]
    return (f"F2 (domain vs generic calibration, on the domain's task): domain calibration wins {wins} of {total} "
            f"comparisons, mean change {effect['delta'].mean():+.1f} points ({'; '.join(lines)})")


def f3(table: pd.DataFrame, runs: pd.DataFrame | None = None) -> str:
    """What accuracy does skipping trade for what speed (and at what realised skip rate)?"""
    rates = {} if runs is None or "skip_rate" not in runs else dict(zip(runs["cell"], runs["skip_rate"], strict=True))
    skipped = table[table["skip"] != "none"]
    if skipped.empty:
        return "F3 (dynamic skipping): not measured"
    parts = []
    for row in skipped.itertuples(index=False):
        plain = table[(table["method_id"] == row.method_id) & (table["ratio"] == row.ratio)
                      & (table["skip"] == "none") & (table["calib"] == row.calib)]
        if plain.empty:
            continue
        p = plain.iloc[0]
        speed = row.decode_speedup / p["decode_speedup"] if p["decode_speedup"] else float("nan")
        rate = rates.get(row.cell)
        rate_text = f", skip rate {rate:.3f} of routed pairs" if rate is not None and rate == rate else ""
        parts.append(f"{row.method_id} {row.ratio:.0%}: accuracy {p['accuracy']:.3f} -> {row.accuracy:.3f}, "
                     f"decode speed x{speed:.2f}{rate_text}")
    return "F3 (dynamic skipping, accuracy and decode speed vs the same pruning without skipping): " + "; ".join(parts)


def f4(table: pd.DataFrame) -> str:
    """Does global allocation (GRAPE) beat uniform budgets (its within-layer score, REAP) at the same total?"""
    parts = [f"{r:.0%}: GRAPE {_fmt(_acc(table, 'grape', r))} vs uniform REAP {_fmt(_acc(table, 'reap', r))} -> "
             f"{_verdict(_acc(table, 'grape', r), _acc(table, 'reap', r))}" for r in (0.25, 0.5, 0.75)]
    return "F4 (global vs uniform budget, same total): " + "; ".join(parts)


def f5(table: pd.DataFrame) -> str:
    """Does input-aware selection beat static pruning at high sparsity (75%)?"""
    static = table[(table["ratio"] == 0.75) & table["method_id"].isin(
        ["frequency", "reap", "naee", "ean", "soft_activation", "premoe", "grape"]) & (table["skip"] == "none")]
    best = static.sort_values("accuracy", ascending=False).head(1)
    best_text = (f"best static {best['method'].iloc[0]} {best['accuracy'].iloc[0]:.3f}" if len(best)
                 else "no static cell")
    # input-aware methods calibrate on one source per task (testbed:domains, a+b), never a generic one
    aware = {m: _acc(table, m, 0.75, calib_generic=False) for m in ("premoe_taer", "prep")}
    parts = [f"{m} {_fmt(v)}" for m, v in aware.items()]
    top = max((v for v in aware.values() if v is not None), default=None)
    verdict = _verdict(top, float(best["accuracy"].iloc[0]) if len(best) else None)
    return f"F5 (input-aware vs static at 75%): {', '.join(parts)}; {best_text} -> {verdict}"


def _best(table: pd.DataFrame, methods, ratio: float) -> tuple[str, float] | None:
    """The best (method, accuracy) among ``methods`` at ``ratio`` (generic calibration, no skipping)."""
    found = [(v, m) for m in methods if (v := _acc(table, m, ratio)) is not None]
    return (max(found)[1], max(found)[0]) if found else None


def f6(table: pd.DataFrame) -> str:
    """Pruning vs merging at equal budget (REAP's claim: pruning prevails for one-shot compression)."""
    kinds = {name: spec.kind for name, spec in load_methods().items() if not spec.is_identity}
    pruning = sorted(m for m, k in kinds.items() if k == "prune")
    merging = sorted(m for m, k in kinds.items() if k == "merge")
    parts = []
    for ratio in (0.25, 0.5):
        named = ", ".join(f"{m} {_fmt(_acc(table, m, ratio))}" for m in (*merging, "reap", "frequency"))
        prune_best, merge_best = _best(table, pruning, ratio), _best(table, merging, ratio)
        if prune_best is None or merge_best is None:
            parts.append(f"at {ratio:.0%}: {named} -> not measured")
            continue
        gap = 100 * (prune_best[1] - merge_best[1])
        verdict = "tie" if gap == 0 else f"{'pruning' if gap > 0 else 'merging'} ahead by {abs(gap):.1f} points"
        parts.append(f"at {ratio:.0%}: {named}; best pruning {prune_best[0]} {prune_best[1]:.3f} vs best merging "
                     f"{merge_best[0]} {merge_best[1]:.3f} -> {verdict}")
    return "F6 (pruning vs merging, same experts kept): " + "; ".join(parts)


def findings(study: StudyData, spec: MetricSpec | None = None) -> list[str]:
    """F1-F6 as sentences with numbers."""
    spec = spec or MetricSpec()
    table = summary(study, spec)
    return [f1(table), f2(study, table, spec), f3(table, study.runs), f4(table), f5(table), f6(table)]
