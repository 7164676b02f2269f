"""Fixed number formatting and plain-text tables shared by Markdown, LaTeX, PDF and leaderboard.

Every number is written with a fixed number of decimals, missing values as ``-``, so regenerating
a report from the same tables gives the same text.
"""

from __future__ import annotations

import math

import pandas as pd

MISSING = "-"
BYTE_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1.0, "B"))


def missing(value) -> bool:
    """True for None and NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or bool(pd.isna(value))


def num(value, decimals: int = 2, scale: float = 1.0) -> str:
    """``value * scale`` with ``decimals`` decimals, or ``-``."""
    return MISSING if missing(value) else f"{float(value) * scale:.{decimals}f}"


def byte_unit(values) -> tuple[float, str]:
    """(divisor, unit) so the largest of ``values`` reads as >= 1 in decimal units."""
    present = [float(v) for v in values if not missing(v)]
    top = max(present) if present else 1e9
    return next(((d, u) for d, u in BYTE_UNITS if top >= d), (1.0, "B"))


def main_rows(table: pd.DataFrame, with_study: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of the main table (see `tables.summary`)."""
    wdiv, wunit = byte_unit(table["weight_bytes"])
    mdiv, munit = byte_unit(table["peak_memory_bytes"])
    header = (["study"] if with_study else []) + [
        "model", "method", "calibration", "ratio", "avg acc (%)", "recovery (%)", f"weights ({wunit})",
        f"peak memory ({munit})", "decode speedup (x)", "flags"]
    rows = []
    for r in table.itertuples(index=False):
        flags = ",".join(f for f, on in (("limited", r.limited),) if on)
        rows.append(([r.study] if with_study else []) + [
            r.model, r.method, r.calib or MISSING, num(r.ratio, 2), num(r.accuracy, 2, 100), num(r.recovery, 1),
            num(r.weight_bytes, 2, 1 / wdiv), num(r.peak_memory_bytes, 2, 1 / mdiv), num(r.decode_speedup, 2),
            flags or MISSING])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]], numeric_from: int | None = None) -> str:
    """A GitHub Markdown table; columns from ``numeric_from`` on are right-aligned."""
    esc = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    align = ["---:" if numeric_from is not None and i >= numeric_from else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(esc[0]) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)


def plain_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Fixed-width text lines (for PDF text pages)."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(cells[0]), "  ".join("-" * w for w in widths), *[fmt(r) for r in cells[1:]]]
