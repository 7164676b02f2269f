"""Fixed number formatting and plain-text tables shared by Markdown, LaTeX, PDF and leaderboard.

Every number is written with a fixed number of decimals, missing values as ``-``, so regenerating
a report from the same tables gives the same text. Accuracies carry their standard error,
``84.56 ± 1.20`` (percent). Text that reaches Markdown (model, method, task, calibration names) is
escaped by `md_escape`: a name can hold ``|``, HTML or Markdown syntax and still read as itself.
"""

from __future__ import annotations

import math
import re

import pandas as pd

MISSING = "-"
BYTE_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1.0, "B"))


def missing(value) -> bool:
    """True for None and NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or bool(pd.isna(value))


def num(value, decimals: int = 2, scale: float = 1.0) -> str:
    """``value * scale`` with ``decimals`` decimals, or ``-``."""
    return MISSING if missing(value) else f"{float(value) * scale:.{decimals}f}"


def pm(value, stderr, decimals: int = 2, scale: float = 1.0) -> str:
    """``value ± stderr`` (both times ``scale``), or the value alone when the stderr is missing."""
    if missing(value):
        return MISSING
    return num(value, decimals, scale) + ("" if missing(stderr) else f" \u00b1 {num(stderr, decimals, scale)}")


_MD_SPECIAL = {"\\": "\\\\", "`": "\\`", "*": "\\*", "[": "\\[", "]": "\\]", "|": "\\|", "$": "\\$", "~": "\\~",
               "<": "&lt;", ">": "&gt;", "&": "&amp;"}


def md_escape(text) -> str:
    """``text`` as literal Markdown (table cells and running text): backslash-escapes ``\\ ` * [ ] | $ ~``,
    writes ``< > &`` as entities (no raw HTML), escapes ``_`` unless it sits inside a word (``a_b`` stays),
    and joins lines."""
    text = " ".join(str(text).splitlines())
    out = "".join(_MD_SPECIAL.get(ch, ch) for ch in text)
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", out)


def byte_unit(values) -> tuple[float, str]:
    """(divisor, unit) so the largest of ``values`` reads as >= 1 in decimal units."""
    present = [float(v) for v in values if not missing(v)]
    top = max(present) if present else 1e9
    return next(((d, u) for d, u in BYTE_UNITS if top >= d), (1.0, "B"))


def main_rows(table: pd.DataFrame, with_study: bool = False,
              units_of: pd.DataFrame | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of the main table (see `tables.summary`); byte units chosen for ``units_of``
    (default: the table itself), so several tables can share them."""
    ref = table if units_of is None else units_of
    wdiv, wunit = byte_unit(ref["weight_bytes"])
    mdiv, munit = byte_unit(ref["run_peak_bytes"])
    header = (["study"] if with_study else []) + [
        "model", "method", "calibration", "ratio", "avg acc ± stderr (%)", "recovery (%)",
        f"resident weights ({wunit})", f"run peak ({munit})", "decode speedup (x)", "flags"]
    rows = []
    for r in table.itertuples(index=False):
        flags = ",".join(f for f, on in (("limited", r.limited), (r.speed_flag, bool(r.speed_flag))) if on)
        rows.append(([r.study] if with_study else []) + [
            r.model, r.method, r.calib or MISSING, num(r.ratio, 2), pm(r.accuracy, r.accuracy_stderr, 2, 100),
            num(r.recovery, 1), num(r.weight_bytes, 2, 1 / wdiv), num(r.run_peak_bytes, 2, 1 / mdiv),
            speedup_text(r.decode_speedup, getattr(r, "decode_speedup_lo", None),
                         getattr(r, "decode_speedup_hi", None)),
            flags or MISSING])
    return header, rows


RECOVERED_NOTE = ("method names ending in `+lora`, `+router_kd` or `+full` (e.g. reap+lora): the cell was trained "
                  "after pruning (a recovery stage of that kind, `recover:` in the study); its twin without that "
                  "training is the row of the same method, calibration and ratio without the suffix.")


def has_recovered(table: pd.DataFrame) -> bool:
    """Whether a main table (`tables.summary`) has a cell trained after its method."""
    return "recover" in table and bool((table["recover"].fillna("") != "").any())


def speedup_text(median, lo, hi) -> str:
    """``1.05 [0.98, 1.10]``: a paired speedup and its 95% interval (the median alone where none), or ``-``."""
    if missing(median):
        return MISSING
    if missing(lo) or missing(hi) or lo == hi == median:
        return num(median, 2)
    return f"{num(median, 2)} [{num(lo, 2)}, {num(hi, 2)}]"


def markdown_table(header: list[str], rows: list[list[str]], numeric_from: int | None = None,
                   link_last: bool = False) -> str:
    """A GitHub Markdown table, every cell escaped (`md_escape`); columns from ``numeric_from`` on are
    right-aligned. With ``link_last``, each row has one more item than ``header``, a URL (already
    percent-encoded, or ``""`` for none) that its last cell links to."""
    if link_last:
        rows = [[*row[:-2], (row[-2], row[-1])] for row in rows]
    esc = [[md_escape(c) for c in header]] + [
        [f"[{md_escape(c[0])}]({c[1]})" if isinstance(c, tuple) and c[1] else
         md_escape(c[0] if isinstance(c, tuple) else c) for c in row] for row in rows]
    align = ["---:" if numeric_from is not None and i >= numeric_from else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(esc[0]) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)
