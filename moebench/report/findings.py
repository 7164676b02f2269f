"""The demo's findings (F1-F6), stated with the measured numbers whichever way they come out.

Every number comes from the study's tidy tables through `moebench.report.tables.summary`
(average accuracy over the multiple-choice tasks) and `moebench.report.domains`. A finding whose
cells are absent says so instead of guessing. Accuracies are in percent with their standard error
(``94.4 ± 0.7%``); a comparison says "tie" only when the difference lies inside its 95% interval,
paired over per-item results where both sides have them, else from the stderrs, and names which
(`moebench.report.uncertainty`). Speeds are paired ratios measured in one process; they differ only
when their 95% interval excludes 1 ("no measurable change" otherwise), and cells timed unpaired or
under load get no speed verdict.

Shared helpers (other findings use them): `_acc` (mean accuracy of the matching cells, a `Score`
carrying its uncertainty), `_fmt` (a score as text) and `_verdict` (yes / no / tie of one score
against another, with the difference and the test).
"""

from __future__ import annotations

import pandas as pd

from moebench.method.registry import load_methods
from moebench.report.domains import calibration_effect
from moebench.report.tables import MetricSpec, StudyData, summary
from moebench.report.uncertainty import Estimate, cell_estimates, combine, difference, speed_verdict

GENERIC = ("testbed:mix", "c4")


class Score(float):
    """A mean accuracy (fraction) that carries its `Estimate` (stderr, per-item values) for `_fmt` and `_verdict`."""

    estimate: Estimate | None = None

    def __new__(cls, estimate: Estimate):
        score = super().__new__(cls, estimate.value)
        score.estimate = estimate
        return score


def with_estimates(table: pd.DataFrame, study: StudyData, spec: MetricSpec) -> pd.DataFrame:
    """``table`` (a `summary`) with an ``estimate`` column: each cell's `Estimate`, items read from its folder."""
    known = cell_estimates(study, table, spec)
    return table.assign(estimate=[known.get(c) for c in table["cell"]])


def _estimate_of(rows: pd.DataFrame) -> Estimate | None:
    if "estimate" in rows:
        return combine(list(rows["estimate"]))
    errs = rows["accuracy_stderr"] if "accuracy_stderr" in rows else pd.Series(float("nan"), index=rows.index)
    return combine([Estimate(float(a), None if pd.isna(e) else float(e), None, (c,))
                    for a, e, c in zip(rows["accuracy"], errs, rows["cell"], strict=True)])


def _acc(table: pd.DataFrame, method: str, ratio: float, calib_generic: bool = True,
         skip: str = "none") -> Score | None:
    """Mean accuracy of the cells of ``method`` at ``ratio`` (generic or no calibration unless told), or None."""
    rows = table[(table["method_id"] == method) & (table["ratio"] == ratio) & (table["skip"] == skip)]
    if calib_generic:
        rows = rows[rows["calib"].isin(GENERIC) | (rows["calib"] == "")]
    rows = rows[rows["accuracy"].notna()]
    est = _estimate_of(rows) if len(rows) else None
    return Score(est) if est is not None else None


def _fmt(value: float | None) -> str:
    """``94.4 ± 0.7%`` (a `Score` with a stderr), ``94.4%`` (any other fraction) or ``n/a``."""
    if value is None:
        return "n/a"
    est = getattr(value, "estimate", None)
    if est is not None and est.stderr is not None:
        return f"{100 * value:.1f} \u00b1 {100 * est.stderr:.1f}%"
    return f"{100 * value:.1f}%"


def _verdict(a: float | None, b: float | None) -> str:
    """Whether ``a`` beats ``b``: ``yes`` / ``no`` / ``tie``, with the difference and its test when known."""
    if a is None or b is None:
        return "not measured"
    ea, eb = getattr(a, "estimate", None), getattr(b, "estimate", None)
    if ea is None or eb is None:
        return "yes" if a > b else ("tie" if a == b else "no")
    diff = difference(ea, eb)
    word = "tie" if diff.tie else ("yes" if diff.points > 0 else "no")
    return f"{word} ({diff.describe()}{': inside its 95% interval' if diff.tie else ''})"


def f1(table: pd.DataFrame) -> str:
    """Does enumeration (NAEE) or REAP beat frequency and random at 25% and 50%?"""
    parts = []
    seeds = table.loc[table["method_id"] == "random", "params"].nunique()
    for ratio in (0.25, 0.5):
        acc = {m: _acc(table, m, ratio) for m in ("naee", "reap", "frequency", "random")}
        best_new = max((v for k, v in acc.items() if k in ("naee", "reap") and v is not None), default=None)
        best_old = max((v for k, v in acc.items() if k in ("frequency", "random") and v is not None), default=None)
        parts.append(f"at {ratio:.0%}: NAEE {_fmt(acc['naee'])}, REAP {_fmt(acc['reap'])}, frequency "
                     f"{_fmt(acc['frequency'])}, random {_fmt(acc['random'])} (mean over {seeds} seeds) -> "
                     f"{_verdict(best_new, best_old)}")
    return "F1 (enumeration / REAP vs frequency / random, best of each pair): " + "; ".join(parts)


def f2(study: StudyData, table: pd.DataFrame, spec: MetricSpec) -> str:
    """Does domain calibration beat generic calibration on the domain's own task?"""
    effect = calibration_effect(study, table, spec)
    if effect.empty:
        return "F2 (domain vs generic calibration): not measured (no domain-calibrated cells)"
    z = 1.96 * effect["delta_stderr"].astype(float)
    tie = (effect["delta"].abs() <= z) | (effect["delta_stderr"].isna() & (effect["delta"] == 0))
    wins, losses = int(((effect["delta"] > 0) & ~tie).sum()), int(((effect["delta"] < 0) & ~tie).sum())
    lines = [f"{r.method} {r.ratio:.0%} on {r.task}: {100 * r.generic:.1f}% -> {100 * r.domain:.1f}% "
             f"({r.delta:+.1f} \u00b1 {r.delta_stderr:.1f}{', tie' if t else ''})"
             for r, t in zip(effect.itertuples(index=False), tie, strict=True)]
    tests = set(effect["delta_test"])
    how = ("paired over the task's items" if tests == {"paired"} else "from the stderrs, no per-item results"
           if tests == {"stderr"} else "paired where both cells have per-item results, else from the stderrs")
    return (f"F2 (domain vs generic calibration, on the domain's task; points \u00b1 stderr, {how}): domain "
            f"calibration wins {wins}, ties {int(tie.sum())} and loses {losses} of {len(effect)} comparisons "
            f"(a tie: inside the 95% interval), mean change {effect['delta'].mean():+.1f} points ({'; '.join(lines)})")


def f3(table: pd.DataFrame, runs: pd.DataFrame | None = None) -> str:
    """What accuracy does skipping trade for what speed (and at what realised skip rate)?

    Speed: the skip cell's own paired ratio against the same pruning with its skip rules paused, in
    the same kernel and process (``skip_decode_speedup``); no verdict on flagged cells.
    """
    rates = {} if runs is None or "skip_rate" not in runs else dict(zip(runs["cell"], runs["skip_rate"], strict=True))
    skipped = table[table["skip"] != "none"]
    if skipped.empty:
        return "F3 (dynamic skipping): not measured"
    parts = []
    for _, row in skipped.iterrows():
        plain = table[(table["method_id"] == row["method_id"]) & (table["ratio"] == row["ratio"])
                      & (table["skip"] == "none") & (table["calib"] == row["calib"])]
        if plain.empty:
            continue
        skip_acc, plain_acc = Score(_estimate_of(skipped.loc[[row.name]])), Score(_estimate_of(plain.iloc[[0]]))
        rate = rates.get(row["cell"])
        rate_text = f", skip rate {rate:.3f} of routed pairs" if rate is not None and rate == rate else ""
        speed = speed_verdict(row, "skip_", flag=row.get("speed_flag", "") or "")
        parts.append(f"{row['method_id']} {row['ratio']:.0%}: accuracy {_fmt(plain_acc)} -> {_fmt(skip_acc)} "
                     f"(change: {_verdict(skip_acc, plain_acc)}), {speed}{rate_text}")
    return ("F3 (dynamic skipping, accuracy and decode speed vs the same pruning without skipping; speed paired "
            "in the skip cell's process, same experts kernel): " + "; ".join(parts))


def f4(table: pd.DataFrame) -> str:
    """Does global allocation (GRAPE) beat uniform budgets (its within-layer score, REAP) at the same total?"""
    parts = [f"{r:.0%}: GRAPE {_fmt(_acc(table, 'grape', r))} vs uniform REAP {_fmt(_acc(table, 'reap', r))} -> "
             f"{_verdict(_acc(table, 'grape', r), _acc(table, 'reap', r))}" for r in (0.25, 0.5, 0.75)]
    return "F4 (global vs uniform budget, same total): " + "; ".join(parts)


def f5(table: pd.DataFrame) -> str:
    """Does input-aware selection beat static pruning at high sparsity (75%)?"""
    static = table[(table["ratio"] == 0.75) & table["method_id"].isin(
        ["frequency", "reap", "naee", "ean", "soft_activation", "premoe", "grape"]) & (table["skip"] == "none")]
    best = static.dropna(subset=["accuracy"]).sort_values(["accuracy", "cell"], ascending=[False, True]).head(1)
    best_score = Score(_estimate_of(best)) if len(best) else None
    best_text = f"best static {best['method'].iloc[0]} {_fmt(best_score)}" if len(best) else "no static cell"
    # input-aware methods calibrate on one source per task (testbed:domains, a+b), never a generic one
    aware = {m: _acc(table, m, 0.75, calib_generic=False) for m in ("premoe_taer", "prep")}
    parts = [f"{m} {_fmt(v)}" for m, v in aware.items()]
    top = max((v for v in aware.values() if v is not None), default=None)
    return f"F5 (input-aware vs static at 75%): {', '.join(parts)}; {best_text} -> {_verdict(top, best_score)}"


def _best(table: pd.DataFrame, methods, ratio: float) -> tuple[str, float] | None:
    """The best (method, accuracy) among ``methods`` at ``ratio`` (generic calibration, no skipping)."""
    found = [(v, m) for m in methods if (v := _acc(table, m, ratio)) is not None]
    return (max(found)[1], max(found)[0]) if found else None


def _ahead(pruning, merging) -> str:
    """``pruning ahead`` / ``merging ahead`` / ``tie`` (by the same test as `_verdict`), with the gap."""
    word, _, rest = _verdict(pruning, merging).partition(" ")
    said = {"yes": "pruning ahead", "no": "merging ahead", "tie": "tie"}[word]
    return f"{said} {rest}" if rest else f"{said} ({100 * (pruning - merging):+.1f} points)"


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
        parts.append(f"at {ratio:.0%}: {named}; best pruning {prune_best[0]} {_fmt(prune_best[1])} vs best merging "
                     f"{merge_best[0]} {_fmt(merge_best[1])} -> {_ahead(prune_best[1], merge_best[1])}")
    return "F6 (pruning vs merging, same experts kept): " + "; ".join(parts)


def findings(study: StudyData, spec: MetricSpec | None = None) -> list[str]:
    """F1-F6 as sentences with numbers."""
    spec = spec or MetricSpec()
    table = with_estimates(summary(study, spec), study, spec)
    return [f1(table), f2(study, table, spec), f3(table, study.runs), f4(table), f5(table), f6(table)]
