"""lm-eval task configurations and their local data, shipped inside the package."""

from __future__ import annotations

from pathlib import Path


def task_dir() -> str:
    """Absolute folder of moebench's task YAMLs: pass it to lm-eval as `include_path`."""
    return str(Path(__file__).resolve().parent)


def task_paths(tasks, include_path=()) -> tuple[list[str], bool]:
    """``(folders, include_defaults)`` of the ``TaskManager`` that `task_manager` builds: what a process without
    moebench (the vLLM environment's) needs to find the same tasks."""
    from lm_eval.tasks import TaskManager

    paths = [task_dir(), *include_path]
    ours = TaskManager(include_path=[task_dir()], include_defaults=False)
    return paths, not set(tasks) <= set(ours.all_tasks)


def task_manager(tasks, include_path=()):
    """An lm-eval ``TaskManager`` that finds ``tasks`` in moebench's folder and ``include_path``.

    Indexing lm-eval's own thousands of task YAMLs takes seconds per process (per grid cell), so
    when every task is one of moebench's packaged tasks (self-contained: no group or include of
    lm-eval's tasks) only the given folders are indexed; otherwise lm-eval's tasks are indexed too.
    """
    from lm_eval.tasks import TaskManager

    paths, defaults = task_paths(tasks, include_path)
    return TaskManager(include_path=paths, include_defaults=defaults)
