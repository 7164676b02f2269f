"""Where a study stands, in the spec's own terms, read in about a second.

`moebench grid status SPEC` answers from the study's results folder: ``study.json`` says which spec
(and which moebench) last prepared it, ``cells/index.csv`` which cell folder is which cell. When
both match the spec file, nothing heavy is imported (no torch, lm-eval or model config is read);
otherwise the spec is validated and expanded as `grid run` would (a few seconds), and the output
says so; then a finished cell whose method parameters resolve differently now (a default changed in
another moebench version) counts as pending, with why, as `grid run` would run it again. Each cell
is named by its method, parameters, ratio, calibration and model, never only by its hash; a running
cell says whether this machine runs it (its pid) or which host does.
"""

from __future__ import annotations

import csv
import json
import os
import socket
from dataclasses import dataclass

from moebench.grid.executors.base import is_done
from moebench.grid.guard import holder, is_locked
from moebench.util import check_name, path_under, read_yaml

STATES = ("done", "running", "failed", "broken", "pending")


def study_root(results: str, study) -> str:
    """``<results>/<study name>``, refused unless the name is a plain folder name inside ``results``."""
    return path_under(results, check_name(study.name, "study name"))


def cell_dir(root: str, cell) -> str:
    """The folder of a cell under a study's results folder (refused if it resolves elsewhere)."""
    return path_under(root, "cells", cell.id)


def plain(data):
    """``data`` as it reads back from JSON (tuples as lists, keys as strings, other values as text)."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


@dataclass
class CellRow:
    """One cell as the index names it: id, folder and its readable fields (`moebench.grid.index.COLUMNS`)."""

    id: str
    folder: str
    fields: dict
    stale: str | None = None  # why a finished cell runs again (`stale_parameters`)

    def label(self) -> str:
        """``reap ratio 0.5 calib testbed:mix`` (+ parameters, skip rule and model), for messages."""
        return describe(self.fields)


def describe(fields: dict, model: bool = True) -> str:
    """A cell in spec terms from its index fields: method, parameters, skip rule, ratio, calibration, model."""
    params = fields.get("params") or ""
    if isinstance(params, str):
        params = json.loads(params) if params else {}
    text = fields["method"] + "".join(f" {k}={v}" for k, v in sorted(params.items()))
    if fields.get("skip") not in (None, "", "none"):
        text += f" skip={fields['skip']}"
    if fields["method"] != "none":
        text += f" ratio {float(fields['ratio']):g}"
    if fields.get("calib"):
        text += f" calib {fields['calib']}"
    if fields.get("recover"):
        text += f" recover {fields['recover']}"
    notes = ([fields["model"]] if model else []) + (["unpruned"] if fields["method"] == "none" else [])
    return text + (f" ({', '.join(notes)})" if notes else "")


def cell_state(folder: str) -> str:
    """``done``, ``running`` (a process holds it), ``failed`` (failure.json, no DONE), ``broken`` (DONE, but
    files that do not verify) or ``pending``."""
    if is_locked(folder):
        return "running"
    if is_done(folder):
        from moebench.grid.results import verify_cell

        return "broken" if verify_cell(folder) else "done"
    return "failed" if os.path.exists(os.path.join(folder, "failure.json")) else "pending"


def who_runs(folder: str, text: str | None = None) -> str:
    """``here, pid N since T`` when this machine holds the cell's lock, else ``on HOST, pid N since T``.
    ``text``: the lock's holder line as read earlier (default: read it now)."""
    text = holder(folder) if text is None else text
    words = text.split()
    if len(words) >= 4 and words[0] == "pid" and words[2] == "on":
        pid, host, rest = words[1], words[3], " ".join(words[4:])
        where = "here" if host == socket.gethostname() else f"on {host}"
        return f"{where}, pid {pid}" + (f" {rest}" if rest else "")
    return text


def failure_line(folder: str) -> str:
    """The last line of a failed cell's traceback (the exception), or what broke a reopened cell."""
    try:
        with open(os.path.join(folder, "failure.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return "see failure.json"
    if isinstance(data, dict) and data.get("broken"):
        return f"broken results: {data['broken']}"
    lines = [line for line in str((data or {}).get("traceback") or "").splitlines() if line.strip()]
    return (lines[-1].strip()[:200] if lines else "see failure.json")


def indexed_cells(spec_path: str, results: str) -> tuple[str, list[CellRow]] | None:
    """``(study root, cells)`` read from the study folder when it was prepared from this very spec by this
    moebench, else None (the caller expands the spec instead)."""
    import moebench

    spec = read_yaml(spec_path)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return None
    try:
        root = path_under(results, check_name(spec["name"], "study name"))
    except ValueError:
        return None
    try:
        with open(os.path.join(root, "study.json"), encoding="utf-8") as f:
            prepared = json.load(f)
        with open(os.path.join(root, "cells", "index.csv"), encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError):
        return None
    if prepared.get("moebench_version") != moebench.__version__ or prepared.get("spec") != plain(spec):
        return None
    cells = []
    for row in rows:
        try:
            cells.append(CellRow(row["cell"], path_under(root, "cells", row["cell"]), row))
        except (KeyError, ValueError):
            return None
    return root, cells


def stale_parameters(cell, folder: str) -> str | None:
    """Why a finished cell no longer answers its spec, or None: its plan was made with method parameters other than
    those the spec resolves to now (a method's default changed since it ran; the cell's id, a hash of the spec as
    written, did not)."""
    from moebench.method.registry import get_method

    if cell.is_baseline:
        return None
    try:
        with open(os.path.join(folder, "plan.json")) as f:
            recorded = json.load(f).get("params")
    except (OSError, ValueError, AttributeError):
        return None  # no plan (an older cell) or a broken one (`reopen_broken` handles that)
    now = json.loads(json.dumps(get_method(cell.method).parse_params(cell.params), sort_keys=True, default=str))
    if not isinstance(recorded, dict) or recorded == now:
        return None
    changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    return "method parameters changed since it ran: " + ", ".join(
        f"{k} {recorded.get(k, '(none)')!r} -> {now.get(k, '(none)')!r}" for k in changed)


def expanded_cells(spec_path: str, results: str) -> tuple[str, list[CellRow]]:
    """``(study root, cells)`` from validating and expanding the spec (imports the method registry). A finished
    cell whose method parameters resolve differently now carries why in ``stale``."""
    from moebench.grid.index import index_row
    from moebench.grid.spec import load_study

    study = load_study(spec_path)
    root = study_root(results, study)
    rows = []
    for cell in study.cells:
        folder = cell_dir(root, cell)
        stale = stale_parameters(cell, folder) if is_done(folder) else None
        rows.append(CellRow(cell.id, folder, index_row(cell, ""), stale))
    return root, rows


def study_status(spec_path: str, results: str) -> tuple[str, dict[str, list[CellRow]], bool]:
    """``(study root, cells by state, read from the index?)`` for the spec at ``spec_path``."""
    found = indexed_cells(spec_path, results)
    fast = found is not None
    root, cells = found if fast else expanded_cells(spec_path, results)
    states: dict[str, list[CellRow]] = {state: [] for state in STATES}
    for cell in cells:
        state = cell_state(cell.folder)
        states["pending" if state == "done" and cell.stale else state].append(cell)
    return root, states, fast


def progress_by_method(states: dict[str, list[CellRow]]) -> str:
    """``frequency 6/6 · reap 5/6``: done cells of each method over its cells, in first-seen order."""
    totals: dict[str, list[int]] = {}
    for state, cells in states.items():
        for cell in cells:
            entry = totals.setdefault(cell.fields["method"], [0, 0])
            entry[1] += 1
            entry[0] += state == "done"
    return " · ".join(f"{method} {done}/{total}" for method, (done, total) in totals.items())


def format_status(name: str, root: str, states: dict[str, list[CellRow]], fast: bool, every: bool = False) -> str:
    """The text of `moebench grid status`: counts, progress by method, then each unfinished cell in spec terms
    (with ``every``, the finished ones too)."""
    total = sum(len(cells) for cells in states.values())
    lines = [f"{name}: {total} cells: " + ", ".join(f"{len(states[s])} {s}" for s in STATES)]
    if not fast:
        lines.append("  (this spec has not been run as it is now: cells expanded from the spec)")
    if total:
        lines.append(f"  by method: {progress_by_method(states)}")
    notes = {"running": who_runs, "failed": failure_line, "broken": failure_line_broken,
             "pending": lambda folder: "", "done": lambda folder: ""}
    for state in STATES:
        if state == "done" and not every:
            continue
        for cell in states[state]:
            note = (f"finished, but stale: {cell.stale} (the next grid run redoes it)" if cell.stale
                    else notes[state](cell.folder))
            lines.append(f"  {state:<8} {cell.label()}" + (f": {note}" if note else "")
                         + f"  [cells/{cell.id}]")
    lines.append(f"  folder: {root} (cells/index.csv names every cell folder)")
    return "\n".join(lines)


def failure_line_broken(folder: str) -> str:
    """Why a finished cell's files do not verify (the next `grid run` redoes it)."""
    from moebench.grid.results import verify_cell

    return f"{verify_cell(folder)} (the next grid run redoes it)"
