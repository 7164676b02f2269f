"""Executors: run grid cells, each an idempotent command, here or on a Slurm cluster.

    ex = make_executor("local", parallel=4)
    res = ex.run(cell_dirs, lambda d: [sys.executable, "-m", "moebench.grid.cell", d])
    print(res.summary())

``local`` (`moebench.grid.executors.local`) runs up to ``parallel`` cell subprocesses at once;
``slurm`` (`moebench.grid.executors.slurm`) submits one job array through submitit. Both share
`moebench.grid.executors.base`: a cell is done only when its command exits 0 and ``DONE`` exists.
"""

from __future__ import annotations

import inspect

from moebench.grid.executors.base import DONE_FILE, CellCommand, Executor, ExecutorResult, is_done
from moebench.grid.executors.local import LocalExecutor
from moebench.util import did_you_mean

EXECUTORS = ("local", "slurm")

__all__ = ["DONE_FILE", "EXECUTORS", "CellCommand", "Executor", "ExecutorResult", "LocalExecutor", "is_done",
           "make_executor"]


def _executor_class(kind: str):
    if kind == "local":
        return LocalExecutor
    from moebench.grid.executors.slurm import SlurmExecutor

    return SlurmExecutor


def make_executor(kind: str = "local", **options) -> Executor:
    """An executor by name: ``"local"`` (options: parallel) or ``"slurm"`` (options: partition,
    time_min, cpus_per_task, mem_gb, gpus_per_node, max_parallel, log_dir, additional, ...)."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r} (known: {', '.join(EXECUTORS)}){did_you_mean(kind, EXECUTORS)}")
    cls = _executor_class(kind)
    known = list(inspect.signature(cls).parameters)
    for name in options:
        if name not in known:
            raise ValueError(f"unknown option {name!r} for the {kind} executor "
                             f"(known: {', '.join(known)}){did_you_mean(name, known)}")
    return cls(**options)
