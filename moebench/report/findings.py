"""The demo's findings (F1-F6, and F7 where the study has recovered cells), stated with the measured numbers
whichever way they come out.

Every number comes from the study's tidy tables through `moebench.report.tables.summary`
(average accuracy over the multiple-choice tasks) and `moebench.report.domains`. A finding whose
cells are absent says so instead of guessing. Accuracies are in percent with their standard error
(``94.4 ± 0.7%``); a comparison says "tie" only when the difference lies inside its 95% interval,
paired over per-item results where both sides have them, else from the stderrs, and names which
(`moebench.report.uncertainty`). Speeds are paired ratios measured in one process; they differ only
when their 95% interval excludes 1 ("no measurable change" otherwise), and cells timed unpaired or
under load get no speed verdict.

F1-F6 compare methods as they prune: they read only cells without a recovery stage (`_plain`), so a
recovered cell (``reap+lora``) never enters its method's numbers. F7 compares each recovered cell with
its twin (the same cell without recovery, `tables.twins`).

Shared helpers (other findings use them): `_acc` (mean accuracy of the matching cells, a `Score`
carrying its uncertainty), `_fmt` (a score as text) and `_verdict` (yes / no / tie of one score
against another, with the difference and the test).
"""

from __future__ import annotations

import pandas as pd

from moebench.method.registry import load_methods
from moebench.report.domains import calibration_effect
from moebench.report.tables import MetricSpec, StudyData, recover_text, summary, twins, unrecovered
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


def _plain(table: pd.DataFrame) -> pd.DataFrame:
    """The cells without a recovery stage: the methods as they prune (all cells of tables from before recovery)."""
    return unrecovered(table)


def _acc(table: pd.DataFrame, method: str, ratio: float, calib_generic: bool = True,
         skip: str = "none") -> Score | None:
    """Mean accuracy of the cells of ``method`` at ``ratio`` (generic or no calibration unless told, no recovery
    stage), or None."""
    table = _plain(table)
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
    seeds = _plain(table).loc[lambda t: t["method_id"] == "random", "params"].nunique()
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
    effect = calibration_effect(study, _plain(table), spec)
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
    table = _plain(table)
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
    """Does global allocation (GRAPE, EvoESAP) beat uniform budgets (their within-layer score, REAP) at the same
    total? EvoESAP is left out of the sentence where the study has no cell of it."""
    has_evo = bool((table["method_id"] == "evoesap").any())
    parts = []
    for r in (0.25, 0.5, 0.75):
        uniform = _acc(table, "reap", r)
        text = f"{r:.0%}: GRAPE {_fmt(_acc(table, 'grape', r))} vs uniform REAP {_fmt(uniform)} -> " \
               f"{_verdict(_acc(table, 'grape', r), uniform)}"
        if has_evo:
            text += f", EvoESAP {_fmt(_acc(table, 'evoesap', r))} -> {_verdict(_acc(table, 'evoesap', r), uniform)}"
        parts.append(text)
    return "F4 (global vs uniform budget, same total): " + "; ".join(parts)


def f5(table: pd.DataFrame) -> str:
    """Does input-aware selection beat static pruning at high sparsity (75%)?"""
    table = _plain(table)
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


def _merge_variants(table: pd.DataFrame, merging: list[str]) -> list[str]:
    """The labels of the merge methods' variants in ``table`` (``hc_smoe``, ``hc_smoe(router=dominant)``), each
    scored apart: a router option changes the merged model. A method without cells keeps its plain name."""
    plain = _plain(table)
    labels = set(plain.loc[plain["method_id"].isin(merging), "method"])
    return sorted(labels | {m for m in merging if m not in set(plain["method_id"])})


def _acc_variant(table: pd.DataFrame, label: str, ratio: float) -> Score | None:
    """`_acc` of the cells whose method label is ``label`` (one variant of a method)."""
    plain = _plain(table)
    ids = plain.loc[plain["method"] == label, "method_id"]
    if ids.empty:
        return None
    return _acc(plain[plain["method"] == label], ids.iloc[0], ratio)


def f6(table: pd.DataFrame) -> str:
    """Pruning vs merging at equal budget (REAP's claim: pruning prevails for one-shot compression); each merge
    variant (its router option) apart."""
    kinds = {name: spec.kind for name, spec in load_methods().items() if not spec.is_identity}
    pruning = sorted(m for m, k in kinds.items() if k == "prune")
    merging = _merge_variants(table, sorted(m for m, k in kinds.items() if k == "merge"))
    parts = []
    for ratio in (0.25, 0.5):
        merged = {m: _acc_variant(table, m, ratio) for m in merging}
        named = ", ".join([f"{m} {_fmt(v)}" for m, v in merged.items()]
                          + [f"{m} {_fmt(_acc(table, m, ratio))}" for m in ("reap", "frequency")])
        prune_best = _best(table, pruning, ratio)
        found = [(v, m) for m, v in merged.items() if v is not None]
        merge_best = (max(found)[1], max(found)[0]) if found else None
        if prune_best is None or merge_best is None:
            parts.append(f"at {ratio:.0%}: {named} -> not measured")
            continue
        parts.append(f"at {ratio:.0%}: {named}; best pruning {prune_best[0]} {_fmt(prune_best[1])} vs best merging "
                     f"{merge_best[0]} {_fmt(merge_best[1])} -> {_ahead(prune_best[1], merge_best[1])}")
    return "F6 (pruning vs merging, same experts kept): " + "; ".join(parts)


def _score(rows: pd.DataFrame) -> Score | None:
    """The `Score` of one cell's row (``rows``: a one-row frame), None without an accuracy."""
    if rows.empty or pd.isna(rows["accuracy"].iloc[0]):
        return None
    est = _estimate_of(rows)
    return Score(est) if est is not None else None


def _gap(before: Score | None, after: Score | None, unpruned: Score | None) -> str:
    """``closes 27% of the gap to the unpruned``: (after - before) / (unpruned - before), in percent."""
    if unpruned is None:
        return "gap closed n/a (no unpruned cell)"
    if before is None or after is None:
        return "gap closed n/a"
    if unpruned - before <= 0:
        return "gap closed n/a (not below the unpruned before recovery)"
    return f"closes {100 * (after - before) / (unpruned - before):.0f}% of the gap to the unpruned"


def _ranking(pairs: list[tuple[str, Score, Score]], which: int) -> str:
    order = sorted(pairs, key=lambda p: (-p[which], p[0]))
    return " > ".join(p[0] for p in order)


def _f7_ratio(table: pd.DataFrame, rows: pd.DataFrame, found: dict, prefix: str) -> str:
    """One model and ratio of F7: each recovered cell against its twin, the gap closed, the rankings."""
    model, ratio = rows["model"].iloc[0], rows["ratio"].iloc[0]
    base = table[(table["model"] == model) & table["baseline"]]
    unpruned = _score(base.iloc[[0]]) if len(base) else None
    named = []
    for _, row in rows.sort_values(["method", "calib", "cell"]).iterrows():
        twin = found.get(row["cell"])
        twin_rows = table[table["cell"] == twin] if twin else table.iloc[:0]
        named.append((twin_rows["method"].iloc[0] if len(twin_rows) else row["method"], row, twin_rows))
    counts = pd.Series([n for n, _, _ in named]).value_counts()
    parts, pairs = [], []
    for name, row, twin_rows in named:
        name += f" [{row['calib']}]" if counts[name] > 1 and row["calib"] else ""
        after = _score(table.loc[[row.name]])
        if twin_rows.empty:
            parts.append(f"{name} {_fmt(after)} (no twin without recovery: same method, parameters, calibration and "
                         "ratio)")
            continue
        before = _score(twin_rows)
        parts.append(f"{name} {_fmt(before)} -> {_fmt(after)} ({_verdict(after, before)}), "
                     f"{_gap(before, after, unpruned)}")
        if before is not None and after is not None:
            pairs.append((name, before, after))
    text = f"{prefix}at {ratio:.0%} (unpruned {_fmt(unpruned)}): " + "; ".join(parts)
    if len(pairs) > 1:
        text += f"; ranking before recovery: {_ranking(pairs, 1)}; after: {_ranking(pairs, 2)}"
    return text


def f7(table: pd.DataFrame, runs: pd.DataFrame | None = None) -> str:
    """What does recovery after pruning buy: each recovered cell against its twin (paired where both have
    per-item results), the share of the gap to the unpruned model it closes, and the methods' ranking at each
    ratio before and after recovery (by mean accuracy)."""
    recovered = table[table["recover"] != ""] if "recover" in table else table.iloc[:0]
    if recovered.empty:
        return "F7 (recovery after pruning): not measured (no recovered cells)"
    settings = {} if runs is None or "recover" not in runs else dict(zip(runs["cell"], runs["recover"], strict=True))
    how = recovered["cell"].map(lambda c: recover_text(settings.get(c, ""))).where(lambda t: t != "",
                                                                                   recovered["recover"])
    found = twins(table)
    texts = sorted(set(how))
    head = f"F7 (recovery after pruning: {texts[0]})" if len(texts) == 1 else "F7 (recovery after pruning)"
    if not any(found.get(c) for c in recovered["cell"]):
        listed = ", ".join(f"{r.method} {r.ratio:.0%} {_fmt(_score(recovered.loc[[i]]))}"
                           for i, r in recovered.sort_values(["method", "ratio", "cell"]).iterrows())
        return (f"{head}: not measured (no recovered cell has a twin without recovery: same model, method, "
                f"parameters, calibration and ratio; recovered: {listed})")
    several = recovered["model"].nunique() > 1
    parts = []
    for text in texts:
        group = recovered[how == text]
        lead = f"{text}: " if len(texts) > 1 else ""
        for k, ((model, _), rows) in enumerate(group.groupby(["model", "ratio"], sort=True)):
            prefix = (lead if k == 0 else "") + (f"{model} " if several else "")
            parts.append(_f7_ratio(table, rows, found, prefix))
    return f"{head}: " + "; ".join(parts)


def findings(study: StudyData, spec: MetricSpec | None = None) -> list[str]:
    """F1-F6 as sentences with numbers, and F7 when the study has recovered cells."""
    spec = spec or MetricSpec()
    table = with_estimates(summary(study, spec), study, spec)
    out = [f1(table), f2(study, table, spec), f3(table, study.runs), f4(table), f5(table), f6(table)]
    if "recover" in table and (table["recover"] != "").any():
        out.append(f7(table, study.runs))
    return out
