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
from moebench.grid.guard import LOCK_FILE, holder, release, study_lock, try_lock
from moebench.grid.index import write_index
from moebench.grid.results import BrokenCellsError, finished_cells, verify_cell, write_tables
from moebench.grid.spec import Cell, Study
from moebench.grid.status import (  # noqa: F401 (re-exported)
    STATES,
    cell_dir,
    cell_state,
    plain,
    stale_parameters,
    study_root,
)
from moebench.util import atomic_write_json


def prepare(study: Study, root: str) -> list[str]:
    """Create the study folder and each cell's ``spec.json`` (atomically); returns the cell folders."""
    os.makedirs(os.path.join(root, "cells"), exist_ok=True)
    import moebench

    atomic_write_json(os.path.join(root, "study.json"), {"name": study.name, "spec": plain(study.spec),
                                                         "path": study.path, "moebench_version": moebench.__version__})
    folders = []
    for cell in study.cells:
        folder = cell_dir(root, cell)
        os.makedirs(folder, exist_ok=True)
        spec_path = os.path.join(folder, "spec.json")
        if not os.path.exists(spec_path):
            atomic_write_json(spec_path, {
                "id": cell.id, "study": study.name, "stats_dir": study.spec.get("stats_dir"),
                "device": study.spec.get("device"), "vllm_python": study.spec.get("vllm_python"),
                "keep_checkpoint": bool(study.spec.get("keep_checkpoints", False)), "spec": cell.to_dict()})
        folders.append(folder)
    return folders


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


def calibration_needs(cells: list[Cell]) -> dict[tuple[str, str], set[str]]:
    """For each (model, calibration source) the cells use, the union of the statistic groups they need."""
    needs: dict[tuple[str, str], set[str]] = {}
    for cell in cells:
        if cell.calib:
            needs.setdefault((cell.model, cell.calib), set()).update(cell.needs() or {"routing"})
    return needs


def calibrate_once(study: Study, cells: list[Cell], progress: bool = True) -> dict[str, float]:
    """Collect, for each (model, calibration) the pending cells use, the union of their statistic groups.

    Runs in this process before any cell starts, so concurrent cells only read the cache. Says
    ``calibration i of N`` before each pass and, from the second on, the time the rest should take.
    Returns seconds spent per ``"<model>|<calibration>"`` (a cache hit costs almost nothing).
    """
    import time

    from moebench.method.pipeline import PlanRequest, single_requests, statistics
    from moebench.moe.checkpoint import load_with_tokenizer

    needs = sorted(calibration_needs(cells).items())
    seconds: dict[str, float] = {}
    for i, ((model_name, calib), groups) in enumerate(needs, 1):
        if progress:
            spent = sum(seconds.values())
            eta = f"; about {_duration(spent / (i - 1) * (len(needs) - i + 1))} left" if i > 1 and spent > 1 else ""
            print(f"calibration {i} of {len(needs)}: {model_name} on {calib} ({', '.join(sorted(groups))}){eta}",
                  flush=True)
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


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _seq_len(model, cell: Cell) -> int:
    """The cell's calibration length, defaulting to what the model can take (at most 2048)."""
    from moebench.moe.view import MoEView

    return cell.calib_seq_len or min(2048, getattr(MoEView(model).config, "max_position_embeddings", 2048) or 2048)


def cell_command(folder: str) -> list[str]:
    """The command that runs one cell in its own process."""
    return [sys.executable, "-m", "moebench.grid.cell", folder]


def choose(study: Study, root: str, only: list[str] | None = None, force: list[str] | None = None,
           retry_failed: bool = False) -> dict:
    """Which cells a run would start, from their state now; reads, writes nothing.

    ``only``: filters (`moebench.grid.select`) a cell must match to run; ``force``: filters of finished cells
    to run again; ``retry_failed``: run only failed and broken cells (plus forced ones). Returns lists of
    ``(cell, folder, state)``: ``run`` (with ``forced`` among them), ``running`` (held by another process),
    ``done`` (finished, left as they are) and ``left`` (unfinished, not selected); ``stale``: ``(cell, folder,
    why)`` of finished cells whose method parameters resolve differently now (`stale_parameters`), which run again
    as forced ones do.
    """
    from moebench.grid.index import index_row
    from moebench.grid.select import select

    entries = [(cell, cell_dir(root, cell), cell_state(cell_dir(root, cell))) for cell in study.cells]
    fields = lambda entry: index_row(entry[0], entry[2])  # noqa: E731
    chosen = {id(e) for e in select(entries, only, fields, "--only")}
    forced = {id(e) for e in select(entries, force, fields, "--force")} if force else set()
    out: dict[str, list] = {"run": [], "forced": [], "running": [], "done": [], "left": [], "stale": []}
    for entry in entries:
        state = entry[2]
        why = stale_parameters(entry[0], entry[1]) if state == "done" and id(entry) in chosen else None
        if why:
            out["run"].append(entry)
            out["forced"].append(entry)
            out["stale"].append((entry[0], entry[1], why))
            continue
        if state == "running":
            out["running" if id(entry) in chosen else "left"].append(entry)
        elif id(entry) not in chosen:
            out["done" if state == "done" else "left"].append(entry)
        elif id(entry) in forced and state == "done":
            out["run"].append(entry)
            out["forced"].append(entry)
        elif state == "done":
            out["done"].append(entry)
        elif retry_failed and state == "pending":
            out["left"].append(entry)
        else:
            out["run"].append(entry)
    return out


def check_sources(study: Study, cells: list[Cell]) -> None:
    """Refuse, before anything is written or loaded, a calibration source the cells need that cannot be read now
    (a hub dataset offline with no local copy and no cached statistics of it), and vLLM cells without a vLLM
    environment to run in."""
    from moebench.calib.cache import default_stats_dir
    from moebench.calib.sources import availability_problem

    for model, calib in sorted(calibration_needs(cells)):
        first = next(c for c in cells if c.model == model and c.calib == calib)
        problem = availability_problem(calib, study.spec.get("stats_dir") or default_stats_dir(),
                                       first.calib_samples, first.seed)
        if problem:
            raise OSError(f"{problem} (needed by the cells on {model}; nothing was run)")
    if any(c.backend == "vllm" for c in cells):  # the vLLM environment exists before any cell prunes
        from moebench.eval.vllm_env import find_python

        find_python(study.spec.get("vllm_python"))


def dry_run(study: Study, root: str, only: list[str] | None = None, force: list[str] | None = None,
            retry_failed: bool = False) -> str:
    """What `grid run` would do, in spec terms: the cells it would start and the calibration passes."""
    from moebench.grid.index import index_row
    from moebench.grid.status import describe

    plan = choose(study, root, only, force, retry_failed)
    forced = {id(e) for e in plan["forced"]}
    stale = {cell.id for cell, _, _ in plan["stale"]}
    lines = [f"{study.name}: would run {len(plan['run'])} of {len(study.cells)} cells "
             f"({len(plan['done'])} done and kept, {len(plan['running'])} running elsewhere, "
             f"{len(plan['left'])} not selected); nothing is written"]
    needs = calibration_needs([e[0] for e in plan["run"]])
    for i, ((model, calib), groups) in enumerate(sorted(needs.items()), 1):
        lines.append(f"  calibration {i} of {len(needs)}: {model} on {calib}: {', '.join(sorted(groups))} "
                     "(read from the statistics cache where it holds them)")
    for entry in plan["run"]:
        why = "stale" if entry[0].id in stale else "forced" if id(entry) in forced else entry[2]
        lines.append(f"  run  {describe(index_row(entry[0], why))}  [{why}; cells/{entry[0].id}]")
    for entry in plan["running"]:
        lines.append(f"  skip {describe(index_row(entry[0], 'running'))}  [running elsewhere; cells/{entry[0].id}]")
    return "\n".join(lines)


def force_rerun(folder: str) -> bool:
    """Hand a finished cell back to the next run (its DONE removed, under its lock); False when another process
    holds it. Its old files are removed when the cell starts again."""
    lock = try_lock(folder)
    if lock is None:
        return False
    try:
        if is_done(folder):
            os.remove(os.path.join(folder, "DONE"))
        return True
    finally:
        release(lock)


def run_grid(study: Study, root: str, executor=None, progress: bool = True, only: list[str] | None = None,
             force: list[str] | None = None, retry_failed: bool = False) -> dict:
    """Run the unfinished cells of ``study`` under ``root`` (those `choose` selects); returns counts, cells and
    table paths.

    ``elsewhere``: cells another process was running; ``reopened``: broken finished cells run again;
    ``forced``: finished cells run again by ``force``; ``left``: unfinished cells not selected.
    """
    from moebench.grid.executors import make_executor

    check_sources(study, [entry[0] for entry in choose(study, root, only, force, retry_failed)["run"]])
    with study_lock(root):
        folders = prepare(study, root)
        reopened = reopen_broken(folders)
        plan = choose(study, root, only, force, retry_failed)
        forced = [folder for _, folder, _ in plan["forced"] if force_rerun(folder)]
        _write_index(study, root)
        pending = [folder for _, folder, _ in plan["run"] if not is_done(folder)]
        elsewhere = [folder for _, folder, _ in plan["running"]]
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
            "skipped": len(plan["done"]), "failed": failed, "elsewhere": elsewhere,
            "holders": {f: holder(f) for f in elsewhere}, "reopened": reopened, "tables": tables,
            "forced": forced, "left": [folder for _, folder, _ in plan["left"]],
            "stale": {folder: why for _, folder, why in plan["stale"]},
            "errors": dict(result.errors) if result else {}}


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
