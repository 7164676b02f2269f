"""A readable index of a study's cell folders: ``results/<study>/cells/index.csv``.

Cell folders are named by the hash of their spec; the index says which is which: one row per cell
of the study with its id, model, method, parameters, ratio, calibration, skip rule and state
(done, failed or pending). The grid runner rewrites it (atomically) before and after a run.
"""

from __future__ import annotations

import csv
import io
import json
import os

from moebench.grid.spec import Cell
from moebench.util import atomic_write_text

COLUMNS = ("cell", "model", "method", "params", "ratio", "calib", "skip", "state")


def index_row(cell: Cell, state: str) -> dict:
    """The index row of one cell in ``state``."""
    return {"cell": cell.id, "model": cell.model, "method": cell.method,
            "params": json.dumps(cell.params, sort_keys=True) if cell.params else "",
            "ratio": f"{cell.ratio:g}", "calib": cell.calib or "", "skip": cell.skip, "state": state}


def write_index(root: str, cells: list[tuple[Cell, str]]) -> str:
    """Write ``<root>/cells/index.csv`` from ``(cell, state)`` pairs in order; returns its path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(index_row(cell, state) for cell, state in cells)
    path = os.path.join(root, "cells", "index.csv")
    atomic_write_text(path, buffer.getvalue())
    return path
