"""The local executor: up to ``parallel`` cell subprocesses of this process at once."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from moebench.grid.executors.base import (
    BUSY_EXIT,
    DONE_FILE,
    CellCommand,
    ExecutorResult,
    is_done,
    progress_bar,
    sigterm_as_exit,
)
from moebench.grid.executors.base import tail as _tail
from moebench.grid.guard import child_environment, is_locked


@dataclass
class LocalExecutor:
    """Runs up to ``parallel`` cell commands at once as subprocesses of this process.

    Each cell's stdout and stderr are appended to ``<cell>/logs/stdout.log`` and ``stderr.log``.
    A cell that another process holds (its lock) or has finished when its turn comes is not
    started: it counts as running elsewhere. Cell processes end when this process ends, even by
    kill -9 (`moebench.grid.guard.die_with_parent`). On Ctrl-C or SIGTERM, running cells (and
    their process groups) are terminated, then the interrupt is raised again.
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
                        if is_locked(cell) or is_done(cell):  # another run has it (or had it)
                            result.elsewhere.append(cell)
                            bar.update(1)
                            continue
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
                                    start_new_session=True, env=child_environment())
        return proc, err_log

    @staticmethod
    def _finish(result: ExecutorResult, bar: tqdm, cell: str, rc: int | None, why: str) -> None:
        if rc == 0 and is_done(cell):
            result.done.append(cell)
        elif rc == BUSY_EXIT:
            result.elsewhere.append(cell)
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
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
            deadline = time.monotonic() + self.kill_after_s
            while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
                time.sleep(0.05)


