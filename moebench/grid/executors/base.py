"""What every executor shares: the result of a run, the DONE rule, the grid progress bar.

A cell command exits 0 once its cell is done (it writes ``<cell>/DONE`` last, itself) and non-zero
on failure. An executor counts a cell done only when both hold afterwards: exit status 0 and a
``DONE`` file. Exit status 75 (`BUSY_EXIT`) means another process holds the cell: it is reported
as running elsewhere, neither done nor failed. Executors write nothing inside a cell folder except
logs (``<cell>/logs/``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from tqdm.auto import tqdm

from moebench.grid.guard import BUSY_EXIT

__all__ = ["BUSY_EXIT", "DONE_FILE", "CellCommand", "Executor", "ExecutorResult", "is_done", "progress_bar",
           "sigterm_as_exit", "tail"]

CellCommand = Callable[[str], list[str]]
"""Cell folder -> argv that brings the cell to done, e.g. ``[python, "-m", "moebench.grid.cell", d]``."""

DONE_FILE = "DONE"


@dataclass
class ExecutorResult:
    """Cell folders that ended done, failed, or were left to another process, in the order given.

    ``errors`` says why each failed cell failed (a short line, with where its log is);
    ``elsewhere`` holds cells another process was running (or had finished) when their turn came.
    """

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    elsewhere: list[str] = field(default_factory=list)

    def summary(self, skipped: int = 0) -> str:
        """One line: ``"4 done, 1 skipped, 0 failed"`` (plus ``", 2 running elsewhere"`` when any)."""
        text = f"{len(self.done)} done, {skipped} skipped, {len(self.failed)} failed"
        return text + (f", {len(self.elsewhere)} running elsewhere" if self.elsewhere else "")

    def _sorted(self, order: list[str]) -> ExecutorResult:
        rank = {d: i for i, d in enumerate(order)}
        for cells in (self.done, self.failed, self.elsewhere):
            cells.sort(key=rank.__getitem__)
        return self


class Executor(Protocol):
    def run(self, cell_dirs: list[str], command: CellCommand, desc: str = "grid") -> ExecutorResult:
        ...


def is_done(cell_dir: str) -> bool:
    return os.path.exists(os.path.join(cell_dir, DONE_FILE))


def progress_bar(total: int, desc: str) -> tqdm:
    """The grid progress bar: cells finished out of ``total``, with rate and ETA."""
    return tqdm(total=total, desc=desc, unit="cell", dynamic_ncols=True, smoothing=0.1)


def tail(path: str, nbytes: int = 4096) -> str:
    """Last non-empty line of a text file ('' when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - nbytes))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


@contextmanager
def sigterm_as_exit():
    """Inside: SIGTERM raises SystemExit(143) in the main thread, so clean-up code runs.

    Only where the handler is still the default one and this is the main thread.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


