"""A readable index of a study's cell folders: ``results/<study>/cells/index.csv``.

Cell folders are named by the hash of their spec; the index says which is which: one row per cell
of the study with its id, model, method, parameters, ratio, calibration, skip rule and state
(done, running, failed, broken or pending). The grid runner rewrites it (atomically) before and after a run;
each cell process marks its own row running when it starts and done or failed when it ends (`mark`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import TYPE_CHECKING

from moebench.util import atomic_write_text

if TYPE_CHECKING:
    from moebench.grid.spec import Cell

COLUMNS = ("cell", "model", "method", "params", "ratio", "calib", "skip", "recover", "state")


def index_row(cell: Cell, state: str) -> dict:
    """The index row of one cell in ``state``."""
    return {"cell": cell.id, "model": cell.model, "method": cell.method,
            "params": json.dumps(cell.params, sort_keys=True) if cell.params else "",
            "ratio": f"{cell.ratio:g}", "calib": cell.calib or "", "skip": cell.skip,
            "recover": cell.recover["kind"] if cell.recover else "", "state": state}


def write_index(root: str, cells: list[tuple[Cell, str]]) -> str:
    """Write ``<root>/cells/index.csv`` from ``(cell, state)`` pairs in order; returns its path."""
    return _write_rows(root, [index_row(cell, state) for cell, state in cells])


def _write_rows(root: str, rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = os.path.join(root, "cells", "index.csv")
    atomic_write_text(path, buffer.getvalue())
    return path


def mark(folder: str, state: str, wait_s: float = 1.0) -> bool:
    """Set the state of the cell in ``folder`` in its study's ``index.csv`` (a cell process says ``running`` when it
    starts, then ``done`` or ``failed``). Done under the study lock, waiting at most ``wait_s``; skipped (False)
    when the lock stays busy or the study has no index: the runner rewrites every row after the run anyway."""
    from moebench.grid.guard import release, try_lock

    root = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
    path = os.path.join(root, "cells", "index.csv")
    if not os.path.isfile(path):
        return False
    lock = try_lock(root, wait_s)
    if lock is None:
        return False
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        name = os.path.basename(os.path.abspath(folder))
        if not rows or list(rows[0]) != list(COLUMNS) or not any(row["cell"] == name for row in rows):
            return False
        for row in rows:
            if row["cell"] == name:
                row["state"] = state
        _write_rows(root, rows)
        return True
    finally:
        release(lock)
