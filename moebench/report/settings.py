"""A study's settings as (name, value) pairs in plain text: the PDF's title page and report.md's list.

Read from the runs table (models, methods, ratios, calibration, devices, versions) and, where the
study folder has one, ``study.json`` (calibration size, lm-eval and measurement settings).
"""

from __future__ import annotations

import pandas as pd

from moebench.report.tables import recover_text
from moebench.report.textfmt import num

UNCERTAINTY = ("\u00b1 is the standard error, in percent: of the average accuracy, sqrt(sum of the tasks' squared "
               "stderrs) / tasks; findings call two cells a tie only when their difference is inside its 95% "
               "interval (paired over items where both cells have per-item results)")


def _spec_pairs(spec: dict) -> list[tuple[str, str]]:
    out = []
    if spec.get("calib_samples") or spec.get("calib_seq_len"):
        out.append(("calibration size", f"{spec.get('calib_samples', '-')} sequences x "
                                        f"{spec.get('calib_seq_len', '-')} tokens, seed {spec.get('seed', 0)}"))
    lm = spec.get("lm_eval") if isinstance(spec.get("lm_eval"), dict) else {}
    if lm:
        out.append(("lm-eval", ", ".join(f"{k} {lm[k]}" for k in sorted(lm))))
    measure = spec.get("measure") if isinstance(spec.get("measure"), dict) else {}
    if measure:
        out.append(("speed measurement", ", ".join(f"{k} {measure[k]}" for k in sorted(measure)) +
                    " (median of the timed repetitions after the warm-up ones)"))
    return out


def _measured_on(runs: pd.DataFrame) -> list[tuple[str, str]]:
    measured = runs[runs["decode_tokens_per_s"].notna()] if "decode_tokens_per_s" in runs else runs.iloc[:0]
    if not len(measured):
        return []
    where = sorted({f"{r.device} ({r.dtype}, {r.expert_kernel} experts kernel)"
                    for r in measured[["device", "dtype", "expert_kernel"]].astype(str).itertuples()})
    largest = pd.to_numeric(measured.get("parameters"), errors="coerce").max() if "parameters" in measured else None
    small = largest is not None and largest == largest and largest < 1e8
    note = (f"; on a CPU, speeds of models this small (at most {largest / 1e6:.1f} M parameters) are dominated "
            "by fixed per-call costs and say little about the methods on real models"
            if small and all(w.startswith("cpu") for w in where) else "")
    pairs = [("speed and memory measured on", "; ".join(where) + note)]
    pairing = measured["speed_pairing"].astype(str).value_counts() if "speed_pairing" in measured else None
    if pairing is not None and len(pairing):
        pairs.append(("speed pairing", ", ".join(f"{k or 'not recorded'} {v}" for k, v in sorted(pairing.items()))
                      + " cells (interleaved: timed alternately with the unpruned model in the cell's process; "
                        "self: the unpruned cell)"))
    if "under_load" in measured:
        loaded = int(measured["under_load"].astype(str).str.lower().eq("true").sum())
        pairs.append(("measured under load", f"{loaded} of {len(measured)} cells (while they were timed, other "
                                             "processes kept busy the cores they needed or more than a quarter of all "
                                             "cores; no speed verdict)"))
    return pairs


def _versions(runs: pd.DataFrame) -> list[tuple[str, str]]:
    parts = []
    for col, name in (("lm_eval_version", "lm-eval"), ("transformers_version", "transformers"),
                      ("torch_version", "torch"), ("moebench_version", "moebench")):
        values = sorted({str(v) for v in runs[col].dropna()}) if col in runs else []
        if values:
            parts.append(f"{name} {' / '.join(values)}")
    return [("versions", ", ".join(parts))] if parts else []


def _recovery_pairs(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """The recovery stages of the study's cells (none: no entry, so reports without them read as before)."""
    if "recover" not in runs:
        return []
    how = [recover_text(v) for v in runs["recover"]]
    counts = pd.Series([h for h in how if h]).value_counts()
    if counts.empty:
        return []
    return [("recovery training", "; ".join(f"{h}: {n} cell{'s' if n > 1 else ''}" for h, n in sorted(counts.items()))
             + ", trained after their method and named method+kind (reap+lora); the recovery (%) column is a share "
               "of the unpruned accuracy, not this stage")]


def settings_pairs(study, table, tasks, spec) -> list[tuple[str, str]]:
    """The study's settings as (name, value) pairs (plain text; escape for Markdown)."""
    runs = study.runs
    limited = int(runs["limited"].sum())
    calibs = sorted(c for c in runs["calib"].unique() if c)
    description = str(study.spec.get("description") or "")
    pairs = [("study", study.name + (f": {description}" if description else "")),
             ("cells", f"{len(runs)}; models: {', '.join(sorted(runs['model'].unique()))}"),
             ("methods", ", ".join(sorted(table.loc[~table["baseline"], "method"].unique())) or "-"),
             ("ratios", ", ".join(num(r, 2) for r in sorted(runs["ratio"].unique()))),
             ("calibration", ", ".join(calibs) or "-"), *_spec_pairs(study.spec),
             ("average accuracy", f"mean over {len(tasks)} task(s) ({', '.join(tasks) or '-'}) of "
                                  f"{spec.describe().replace('`', '')}; group aggregates (score rows without a "
                                  "sample count) are left out"),
             ("uncertainty", UNCERTAINTY),
             ("recovery, speedup", "recovery: average accuracy / the unpruned cell's (method none, ratio 0) of the "
                                   "same model x 100; decode speedup: the median over repetitions of the unpruned "
                                   "model's time / the variant's, timed interleaved in the cell's process and "
                                   "experts kernel, with a 95% interval of that median"),
             ("memory", "resident weights: bytes of the parameters after the method (computed); run peak: measured "
                        "from after the method is applied to the end of evaluation and the variant's own timing "
                        "(GPU: bytes torch allocated, summed over devices; CPU: the cell process's peak resident "
                        "set, VmHWM, reset after the method is applied)"),
             ("limited runs", f"{limited} of {len(runs)}" + (" (flagged limited; not on the leaderboard)" if limited
                                                             else "")),
             *_measured_on(runs), *_versions(runs)]
    pairs += _recovery_pairs(runs)
    if "mixed_versions" in runs and runs["mixed_versions"].astype(str).str.lower().eq("true").any():
        pairs.append(("WARNING", "the cells differ in lm-eval or task versions (collected with --allow-mixed)"))
    return pairs
