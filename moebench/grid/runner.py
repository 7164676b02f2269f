"""The grid runner: a study's cells in ``results/<study>/cells/<id>/``, run once each, resumable.

`run_grid` writes each cell's ``spec.json``, calibrates once per (model, calibration set) for the
whole grid, hands the unfinished cells to an executor (one process per cell), then derives the
tidy tables. A cell is finished when its folder holds ``DONE`` (written last, atomically) and its
files verify (`moebench.grid.results.verify_cell`); a failed cell leaves ``failure.json`` and runs
again next time, and so does a broken one (its DONE is removed). Killing a run at any moment loses
nothing finished and duplicates nothing.

Concurrent runs of one study share the work: each cell runs under its own lock, cells another
process holds are skipped and reported as running elsewhere, and the study-level steps (folders,
calibration, tables) take the study lock in turn (`moebench.grid.guard`). Nothing is written
outside the study folder: its name is checked (`moebench.util.check_name`) and every path
resolved against the results folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from moebench.grid.executors.base import is_done
from moebench.grid.guard import LOCK_FILE, holder, is_locked, release, study_lock, try_lock
from moebench.grid.index import write_index
from moebench.grid.results import BrokenCellsError, finished_cells, verify_cell, write_tables
from moebench.grid.spec import Cell, Study
from moebench.util import atomic_write_json, check_name, path_under


def study_root(results: str, study: Study) -> str:
    """``<results>/<study name>``, refused unless the name is a plain folder name inside ``results``."""
    return path_under(results, check_name(study.name, "study name"))


def cell_dir(root: str, cell: Cell) -> str:
    """The folder of a cell under a study's results folder (refused if it resolves elsewhere)."""
    return path_under(root, "cells", cell.id)


def prepare(study: Study, root: str) -> list[str]:
    """Create the study folder and each cell's ``spec.json`` (atomically); returns the cell folders."""
    os.makedirs(os.path.join(root, "cells"), exist_ok=True)
    atomic_write_json(os.path.join(root, "study.json"), {"name": study.name, "spec": study.spec, "path": study.path})
    folders = []
    for cell in study.cells:
        folder = cell_dir(root, cell)
        os.makedirs(folder, exist_ok=True)
        spec_path = os.path.join(folder, "spec.json")
        if not os.path.exists(spec_path):
            atomic_write_json(spec_path, {"id": cell.id, "study": study.name, "stats_dir": study.spec.get("stats_dir"),
                                          "device": study.spec.get("device"), "spec": cell.to_dict()})
        folders.append(folder)
    return folders


STATES = ("done", "running", "failed", "broken", "pending")


def cell_state(folder: str) -> str:
    """``done``, ``running`` (another process holds it), ``failed`` (failure.json, no DONE),
    ``broken`` (DONE, but files that do not verify) or ``pending``."""
    if is_locked(folder):
        return "running"
    if is_done(folder):
        return "broken" if verify_cell(folder) else "done"
    return "failed" if os.path.exists(os.path.join(folder, "failure.json")) else "pending"


def reopen(folder: str, problem: str) -> bool:
    """Hand a broken finished cell back to the next run: remove its DONE, record why in failure.json.

    Done under the cell's lock; returns False (and changes nothing) when another process holds it.
    """
    lock = try_lock(folder)
    if lock is None:
        return False
    try:
        if is_done(folder):
            atomic_write_json(os.path.join(folder, "failure.json"), {"broken": problem, "traceback": None})
            os.remove(os.path.join(folder, "DONE"))
        return True
    finally:
        release(lock)


def reopen_broken(folders: list[str]) -> dict[str, str]:
    """Reopen every finished cell of ``folders`` whose files do not verify; returns folder -> problem."""
    broken = {f: p for f in folders if is_done(f) and (p := verify_cell(f)) is not None}
    return {f: p for f, p in broken.items() if reopen(f, p)}


def calibrate_once(study: Study, cells: list[Cell], progress: bool = True) -> dict[str, float]:
    """Collect, for each (model, calibration) the pending cells use, the union of their statistic groups.

    Runs in this process before any cell starts, so concurrent cells only read the cache.
    Returns seconds spent per ``"<model>|<calibration>"`` (a cache hit costs almost nothing).
    """
    import time

    from moebench.method.pipeline import PlanRequest, single_requests, statistics
    from moebench.moe.checkpoint import load_with_tokenizer

    needs: dict[tuple[str, str], set[str]] = {}
    for cell in cells:
        if cell.calib:
            needs.setdefault((cell.model, cell.calib), set()).update(cell.needs() or {"routing"})
    seconds = {}
    for (model_name, calib), groups in sorted(needs.items()):
        start = time.perf_counter()
        model, tokenizer = load_with_tokenizer(model_name, dtype=study.spec.get("dtype", "auto"),
                                               device=study.spec.get("device"))
        first = next(c for c in cells if c.model == model_name and c.calib == calib)
        request = PlanRequest(method="none", calib=calib, calib_samples=first.calib_samples,
                              calib_seq_len=_seq_len(model, first), seed=first.seed,
                              stats_dir=study.spec.get("stats_dir"), model_id=model_name,
                              subsample_tokens=first.subsample_tokens, ratio_samples=first.ratio_samples)
        for single in single_requests(request):  # several sources for select methods, cached apart
            statistics(model, tokenizer, single, sorted(groups), progress=progress)
        del model
        seconds[f"{model_name}|{calib}"] = round(time.perf_counter() - start, 3)
    return seconds


def _seq_len(model, cell: Cell) -> int:
    """The cell's calibration length, defaulting to what the model can take (at most 2048)."""
    from moebench.moe.view import MoEView

    return cell.calib_seq_len or min(2048, getattr(MoEView(model).config, "max_position_embeddings", 2048) or 2048)


def cell_command(folder: str) -> list[str]:
    """The command that runs one cell in its own process."""
    return [sys.executable, "-m", "moebench.grid.cell", folder]


def run_grid(study: Study, root: str, executor=None, progress: bool = True) -> dict:
    """Run every unfinished cell of ``study`` under ``root``; returns counts, cells and table paths.

    ``elsewhere``: cells another process was running; ``reopened``: broken finished cells run again.
    """
    from moebench.grid.executors import make_executor

    with study_lock(root):
        folders = prepare(study, root)
        reopened = reopen_broken(folders)
        _write_index(study, root)
        unfinished = [f for f in folders if not is_done(f)]
        elsewhere = [f for f in unfinished if is_locked(f)]
        pending = [f for f in unfinished if f not in elsewhere]
        by_folder = dict(zip(folders, study.cells, strict=True))
        seconds = calibrate_once(study, [by_folder[f] for f in pending], progress)
        _record_calibration(root, seconds)
    if executor is None:
        options = dict(study.spec.get("executor") or {})
        executor = make_executor(options.pop("kind", "local"), **options)
    result = executor.run(pending, cell_command, desc=study.name) if pending else None
    failed = sorted(result.failed) if result else []
    elsewhere = sorted({*elsewhere, *(result.elsewhere if result else [])})
    with study_lock(root):
        _write_index(study, root)
        tables = write_tables(root, skip_broken=True) if any(is_done(f) for f in folders) else {}
    return {"cells": len(folders), "done": len(result.done) if result else 0,
            "skipped": len(folders) - len(unfinished), "failed": failed, "elsewhere": elsewhere,
            "holders": {f: holder(f) for f in elsewhere}, "reopened": reopened, "tables": tables}


def collect(results_dir: str, allow_mixed: bool = False, skip_broken: bool = False) -> tuple[dict, dict]:
    """Write the tidy tables of ``results_dir``; returns ``(table paths, broken cells)``.

    Broken finished cells are handed back to the next `run_grid` (their DONE removed), then refused
    by path (`BrokenCellsError`), or left out of the tables with ``skip_broken``.
    """
    broken = {f: p for f in finished_cells(results_dir) if (p := verify_cell(f)) is not None}
    for folder, problem in broken.items():
        reopen(folder, problem)
    if broken and not skip_broken:
        raise BrokenCellsError(broken)
    return write_tables(results_dir, allow_mixed, skip_broken), broken


def _write_index(study: Study, root: str) -> None:
    """``cells/index.csv``: which hash-named folder holds which cell, and its state now."""
    write_index(root, [(cell, cell_state(cell_dir(root, cell))) for cell in study.cells])


def _record_calibration(root: str, seconds: dict[str, float]) -> None:
    """Keep the first measured calibration time per (model, calibration) in ``calibration.json``."""
    path = os.path.join(root, "calibration.json")
    known = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    atomic_write_json(path, {**seconds, **known})


def status(study: Study, root: str) -> dict[str, list[str]]:
    """Cell folders of a study by state (`STATES`: done, running, failed, broken, pending)."""
    states: dict[str, list[str]] = {state: [] for state in STATES}
    for cell in study.cells:
        folder = cell_dir(root, cell)
        states[cell_state(folder)].append(folder)
    return states


def clean_partial(folder: str) -> None:
    """Remove what an interrupted or failed attempt left in a cell folder (spec.json, logs and the
    lock stay). Call it only while holding the cell's lock."""
    for name in os.listdir(folder):
        if name in ("spec.json", "logs", LOCK_FILE):
            continue
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
