"""Executors: run grid cells, each an idempotent command, here or on a Slurm cluster.

A cell command exits 0 once its cell is done (it writes ``<cell>/DONE`` last, itself) and non-zero
on failure. An executor counts a cell done only when both hold afterwards: exit status 0 and a
``DONE`` file. Executors write nothing inside a cell folder except logs (``<cell>/logs/``).

    ex = make_executor("local", parallel=4)
    res = ex.run(cell_dirs, lambda d: [sys.executable, "-m", "moebench.grid.cell", d])
    print(res.summary())

``local`` runs up to ``parallel`` cell subprocesses at once; ``slurm`` submits one job array
through submitit (see ``moebench.grid.executors.slurm``).
"""

from __future__ import annotations

import datetime
import difflib
import inspect
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from tqdm.auto import tqdm

CellCommand = Callable[[str], list[str]]
"""Cell folder -> argv that brings the cell to done, e.g. ``[python, "-m", "moebench.grid.cell", d]``."""

DONE_FILE = "DONE"


@dataclass
class ExecutorResult:
    """Cell folders that ended done and failed, in the order they were given.

    ``errors`` says why each failed cell failed (a short line, with where its log is).
    """

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self, skipped: int = 0) -> str:
        """One line: ``"4 done, 1 skipped, 0 failed"``."""
        return f"{len(self.done)} done, {skipped} skipped, {len(self.failed)} failed"

    def _sorted(self, order: list[str]) -> ExecutorResult:
        rank = {d: i for i, d in enumerate(order)}
        self.done.sort(key=rank.__getitem__)
        self.failed.sort(key=rank.__getitem__)
        return self


class Executor(Protocol):
    def run(self, cell_dirs: list[str], command: CellCommand, desc: str = "grid") -> ExecutorResult:
        ...


def is_done(cell_dir: str) -> bool:
    return os.path.exists(os.path.join(cell_dir, DONE_FILE))


def progress_bar(total: int, desc: str) -> tqdm:
    """The grid progress bar: cells finished out of ``total``, with rate and ETA."""
    return tqdm(total=total, desc=desc, unit="cell", dynamic_ncols=True, smoothing=0.1)


def _tail(path: str, nbytes: int = 4096) -> str:
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


@dataclass
class LocalExecutor:
    """Runs up to ``parallel`` cell commands at once as subprocesses of this process.

    Each cell's stdout and stderr are appended to ``<cell>/logs/stdout.log`` and ``stderr.log``.
    On Ctrl-C or SIGTERM, running cells (and their process groups) are terminated, then the
    interrupt is raised again.
    """

    parallel: int = 1
    poll_s: float = 0.1
    kill_after_s: float = 10.0

    def __post_init__(self):
        if int(self.parallel) < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        self.parallel = int(self.parallel)

    def run(self, cell_dirs: list[str], command: CellCommand, desc: str = "grid") -> ExecutorResult:
        result = ExecutorResult()
        pending = list(reversed(cell_dirs))
        running: dict[str, tuple[subprocess.Popen, str]] = {}
        with progress_bar(len(cell_dirs), desc) as bar, sigterm_as_exit():
            try:
                while pending or running:
                    while pending and len(running) < self.parallel:
                        cell = pending.pop()
                        try:
                            running[cell] = self._start(cell, command(cell))
                        except (OSError, ValueError, TypeError) as e:
                            self._finish(result, bar, cell, None, f"could not start: {e}")
                    for cell, (proc, err_log) in list(running.items()):
                        rc = proc.poll()
                        if rc is not None:
                            del running[cell]
                            self._finish(result, bar, cell, rc, _tail(err_log))
                    if running:
                        time.sleep(self.poll_s)
            except BaseException:
                self._terminate([proc for proc, _ in running.values()])
                raise
        return result._sorted(list(cell_dirs))

    @staticmethod
    def _start(cell: str, argv: list[str]) -> tuple[subprocess.Popen, str]:
        logs = os.path.join(cell, "logs")
        os.makedirs(logs, exist_ok=True)
        out_log, err_log = os.path.join(logs, "stdout.log"), os.path.join(logs, "stderr.log")
        header = f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {list(argv)}\n"
        with open(out_log, "a") as out, open(err_log, "a") as err:
            out.write(header)
            err.write(header)
            out.flush()
            err.flush()
            # A session of its own: Ctrl-C reaches only us, and we stop the whole process group.
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        return proc, err_log

    @staticmethod
    def _finish(result: ExecutorResult, bar: tqdm, cell: str, rc: int | None, why: str) -> None:
        if rc == 0 and is_done(cell):
            result.done.append(cell)
        else:
            result.failed.append(cell)
            if rc is None:
                msg = why
            elif rc == 0:
                msg = f"exited 0 but wrote no {DONE_FILE}"
            else:
                msg = f"exit status {rc}" + (f": {why}" if why else "")
            log = os.path.join(cell, "logs", "stderr.log")
            result.errors[cell] = msg + (f" (log: {log})" if os.path.exists(log) else "")
            bar.set_postfix(failed=len(result.failed), refresh=False)
        bar.update(1)

    def _terminate(self, procs: list[subprocess.Popen]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in procs if p.poll() is None]
            for p in alive:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + self.kill_after_s
            while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
                time.sleep(0.05)


def _executor_class(kind: str):
    if kind == "local":
        return LocalExecutor
    from moebench.grid.executors.slurm import SlurmExecutor

    return SlurmExecutor


EXECUTORS = ("local", "slurm")


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def make_executor(kind: str = "local", **options) -> Executor:
    """An executor by name: ``"local"`` (options: parallel) or ``"slurm"`` (options: partition,
    time_min, cpus_per_task, mem_gb, gpus_per_node, max_parallel, log_dir, additional, ...)."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r} (known: {', '.join(EXECUTORS)})"
                         + _did_you_mean(kind, EXECUTORS))
    cls = _executor_class(kind)
    known = list(inspect.signature(cls).parameters)
    for name in options:
        if name not in known:
            raise ValueError(f"unknown option {name!r} for the {kind} executor "
                             f"(known: {', '.join(known)})" + _did_you_mean(name, known))
    return cls(**options)
