"""The Slurm executor: grid cells as one job array submitted through submitit.

Each array task runs one cell command in a subprocess. The callable is checkpointable, so a task
that is preempted or reaches its time limit is requeued (submitit asks Slurm to send a signal
``signal_delay_s`` before the limit; the checkpoint stops the cell command and resubmits the same
call). Cell commands are idempotent, so running one again is safe: it resumes or redoes its cell.

The driver polls until every task has finished, with a progress bar. A task is finished when it
wrote its result file (success or the cell's error); the queue is read with ``squeue``, so no
accounting (``sacct``/slurmdbd) is needed: a task that left the queue without writing a result
(cancelled, killed, node lost) is counted failed after ``vanish_grace_s`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from submitit.helpers import Checkpointable

from moebench.grid.executors.base import BUSY_EXIT, DONE_FILE, CellCommand, ExecutorResult, is_done, progress_bar
from moebench.grid.guard import child_environment

ELSEWHERE = "elsewhere"  # a task's result when another process held its cell


class CellTask(Checkpointable):
    """Picklable: ``task(cell_dir, argv)`` runs argv and raises when it fails.

    Returns ``cell_dir`` when the cell is done, `ELSEWHERE` when another process held it.
    """

    def __init__(self, kill_after_s: float = 30.0, wait_for_kill_s: float = 900.0):
        self.kill_after_s = kill_after_s
        self.wait_for_kill_s = wait_for_kill_s
        self._proc: subprocess.Popen | None = None
        self._terminating = False

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proc"] = None          # a live process does not travel with a requeued job
        return state

    def __call__(self, cell_dir: str, argv: list[str]) -> str:
        # stdout/stderr are inherited: they go to the task's submitit log files. A session of its
        # own lets checkpoint() stop the command with everything it started.
        self._terminating = False
        self._proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, start_new_session=True,
                                      env=child_environment())
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            # Poll rather than block in wait(): the requeue signal handler runs in this thread
            # and must not find Popen's wait lock held.
            while (rc := self._proc.poll()) is None:
                time.sleep(0.2)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._proc = None
        if self._terminating and not (rc == 0 and is_done(cell_dir)):
            # Slurm is ending this job (preemption without a warning signal, cancellation, time
            # limit): it will kill us, and requeue the job where that is the policy. Reporting
            # the stopped cell as failed would be wrong, so wait to be killed.
            time.sleep(self.wait_for_kill_s)
            raise RuntimeError(f"cell command stopped by SIGTERM and the job was not ended: {cell_dir}")
        if rc == BUSY_EXIT:
            return ELSEWHERE
        if rc != 0:
            raise RuntimeError(f"cell command exited with status {rc}: {cell_dir}")
        if not is_done(cell_dir):
            raise RuntimeError(f"cell command exited 0 but wrote no {DONE_FILE}: {cell_dir}")
        return cell_dir

    def _on_sigterm(self, signum, frame) -> None:
        print("moebench: SIGTERM from Slurm: stopping the cell command, waiting for the job to end",
              file=sys.stderr, flush=True)
        self._terminating = True
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGTERM)

    def checkpoint(self, *args, **kwargs):
        """Called on preemption or time-out: stop the running cell command, requeue the call."""
        if self._proc is not None:
            _stop_group(self._proc.pid, self.kill_after_s)
        return super().checkpoint(*args, **kwargs)


def _stop_group(pid: int, kill_after_s: float) -> None:
    """SIGTERM the process group of ``pid``, SIGKILL it after ``kill_after_s``; reap ``pid``.

    Uses os.waitpid directly: this runs inside a signal handler that may have interrupted Popen.
    """
    for sig, wait_s in ((signal.SIGTERM, kill_after_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                return
            time.sleep(0.1)


def _queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """Array task id ("123_4") -> state, for tasks still in the queue; None when unknown."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # Jobs purged from the controller's memory are "invalid": none of them is queued.
        return {} if "invalid job id" in out.stderr.lower() else None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def _error_line(exc: BaseException, log: str) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    ours = [ln for ln in lines if "cell command" in ln]
    line = (ours or [ln for ln in lines if "Error" in ln] or lines or [type(exc).__name__])[-1]
    return f"{line[:300]} (log: {log})"


@dataclass
class SlurmExecutor:
    """One Slurm job array per ``run``; ``max_parallel`` caps how many tasks run at once.

    ``log_dir`` holds submitit's pickles and each task's logs (default: a ``slurm`` folder beside
    the cell folders). ``additional`` passes further sbatch options, e.g. ``{"qos": "low"}``.
    """

    partition: str | None = None
    time_min: int = 60
    cpus_per_task: int = 1
    mem_gb: float | None = None
    gpus_per_node: int | None = None
    max_parallel: int | None = None
    log_dir: str | None = None
    additional: dict | None = None
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    poll_s: float = 5.0
    vanish_grace_s: float = 60.0
    cancel_on_interrupt: bool = True

    def _submitit_executor(self, log_dir: str, desc: str, n: int):
        import submitit

        ex = submitit.SlurmExecutor(folder=log_dir, max_num_timeout=self.max_num_timeout)
        params = {"job_name": desc, "time": int(self.time_min), "cpus_per_task": int(self.cpus_per_task),
                  "signal_delay_s": int(self.signal_delay_s),
                  "array_parallelism": int(self.max_parallel or n),
                  "additional_parameters": dict(self.additional or {})}
        if self.partition:
            params["partition"] = self.partition
        if self.mem_gb:
            params["mem"] = f"{int(self.mem_gb * 1024)}MB"
        if self.gpus_per_node:
            params["gpus_per_node"] = int(self.gpus_per_node)
        ex.update_parameters(**params)
        return ex

    def run(self, cell_dirs: list[str], command: CellCommand, desc: str = "grid") -> ExecutorResult:
        result = ExecutorResult()
        if not cell_dirs:
            return result
        cells = [os.path.abspath(d) for d in cell_dirs]
        log_dir = self.log_dir or os.path.join(os.path.commonpath([os.path.dirname(c) for c in cells]),
                                               "slurm")
        os.makedirs(log_dir, exist_ok=True)
        ex = self._submitit_executor(log_dir, desc, len(cells))
        jobs = ex.map_array(CellTask(), cells, [list(command(c)) for c in cells])
        pending = dict(zip(cells, jobs, strict=True))
        gone_since: dict[str, float] = {}
        shown: dict = {}
        with progress_bar(len(cells), desc) as bar:
            try:
                while pending:
                    queue = _queue_states(sorted({j.job_id.split("_")[0] for j in pending.values()}))
                    now = time.monotonic()
                    for cell, job in list(pending.items()):
                        # A task is finished once it wrote its result (sacct is not needed).
                        if job.paths.result_pickle.exists():
                            exc = job.exception()
                            if exc is None and job.result() == ELSEWHERE:
                                del pending[cell]
                                result.elsewhere.append(cell)
                                bar.update(1)
                                continue
                            if exc is not None:
                                error = _error_line(exc, str(job.paths.stderr))
                            elif not is_done(cell):
                                error = f"the job ended but {DONE_FILE} is missing (log: {job.paths.stderr})"
                            else:
                                error = None
                        elif queue is not None and job.job_id not in queue:
                            first = gone_since.setdefault(cell, now)
                            if now - first < self.vanish_grace_s:
                                continue
                            error = (f"job {job.job_id} left the queue without a result "
                                     f"(cancelled, killed or failed to start; log: {job.paths.stderr})")
                        else:
                            gone_since.pop(cell, None)
                            continue
                        del pending[cell]
                        if error is None:
                            result.done.append(cell)
                        else:
                            result.failed.append(cell)
                            result.errors[cell] = error
                        bar.update(1)
                    if queue is not None:
                        states = [queue.get(j.job_id, "") for j in pending.values()]
                        postfix = {"running": states.count("RUNNING"), "queued": states.count("PENDING"),
                                   "failed": len(result.failed)}
                        if postfix != shown:
                            bar.set_postfix(ordered_dict=postfix)
                            shown = postfix
                    if pending:
                        time.sleep(self.poll_s)
            except BaseException:
                if self.cancel_on_interrupt:
                    for job in pending.values():
                        with contextlib.suppress(Exception):  # best effort while interrupted
                            job.cancel(check=False)
                raise
        order = dict(zip(cells, cell_dirs, strict=True))
        result.done = [order[c] for c in result.done]
        result.failed = [order[c] for c in result.failed]
        result.elsewhere = [order[c] for c in result.elsewhere]
        result.errors = {order[c]: e for c, e in result.errors.items()}
        return result._sorted(list(cell_dirs))
